"""Flax NNX model families and the registry the importer uses."""
