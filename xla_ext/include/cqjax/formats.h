// The CQ packed layout (v1), mirrored from cqjax/formats/cq.py (the Python
// source of truth); tests/test_kernel_format.py checks that both agree and
// tests/golden/cq_pack_v1.json pins the bytes.
//
// A weight is a matrix w[rows, K]; each row is quantized along K in blocks.
//
// Block plan (BlockPlan, defaults block=128, min_block=16): as many full
// `block` as fit, the tail split greedily into smaller powers of two down to
// `min_block`, a last remainder < min_block padded to one more min_block
// block. Kpad = sum(blocks), padding = Kpad - K < min_block.
//
// | K    | blocks                  | Kpad |
// |------|-------------------------|------|
// | 576  | 128, 128, 128, 128, 64  | 576  |
// | 100  | 64, 32, 16              | 112  |
// | 17   | 16, 16                  | 32   |
//
// Packed codes, uint8 codes in [0, 2^bits), one per padded coordinate:
//
// | item      | layout                                                       |
// |-----------|--------------------------------------------------------------|
// | rows      | row-major, row r at bytes [r*row_bytes, (r+1)*row_bytes)     |
// | row_bytes | Kpad * bits / 8, Kpad % 8 == 0                               |
// | 1/2/4 bit | code k in bits (k % per)*bits .. of byte k / per, per=8/bits |
// | 3 bit     | 2-bit plane of (code & 3) (Kpad/4 bytes), then the 1-bit     |
// |           | plane of (code >> 2) (Kpad/8 bytes); code = lo | hi << 2     |
// | 8 bit     | byte k = code k                                              |
//
// Beside the codes: norms float16 [rows, nblocks] and codebooks float16
// [nblocks, 2^bits]; the decoded rotated row is w[k] = cb[j][code k] * norm[j]
// for k in block j.
#ifndef CQJAX_FORMATS_H_
#define CQJAX_FORMATS_H_

#include <cstdint>
#include <cstring>
#include <vector>

namespace cqjax {
namespace formats {

inline constexpr int kLayoutVersion = 1;
inline constexpr int kSupportedBits[] = {1, 2, 3, 4, 8};

inline bool IsPow2(long v) { return v > 0 && (v & (v - 1)) == 0; }

inline bool BitsSupported(int bits) {
  for (int b : kSupportedBits) {
    if (b == bits) return true;
  }
  return false;
}

// Block sizes along K; empty when the arguments are invalid.
inline std::vector<int> BlockPlan(int K, int block = 128, int min_block = 16) {
  std::vector<int> out;
  if (!IsPow2(block) || !IsPow2(min_block) || min_block > block || K < 1) return out;
  for (int i = 0; i < K / block; ++i) out.push_back(block);
  int tail = K % block;
  for (int size = block / 2; size >= min_block; size /= 2) {
    if (tail >= size) {
      out.push_back(size);
      tail -= size;
    }
  }
  if (tail) out.push_back(min_block);
  return out;
}

// Bytes of one packed row (Kpad % 8 == 0).
inline int RowBytes(int Kpad, int bits) { return Kpad * bits / 8; }

// Code k of one packed row (scalar, the reference decoder).
inline int UnpackCode(const uint8_t* row, int k, int bits, int Kpad) {
  switch (bits) {
    case 8:
      return row[k];
    case 3: {
      const int lo = (row[k / 4] >> (2 * (k % 4))) & 3;
      const int hi = (row[Kpad / 4 + k / 8] >> (k % 8)) & 1;
      return lo | (hi << 2);
    }
    default: {
      const int per = 8 / bits;
      return (row[k / per] >> (bits * (k % per))) & ((1 << bits) - 1);
    }
  }
}

// Packs codes[Kpad] into row[RowBytes(Kpad, bits)] (inverse of UnpackCode).
inline void PackRow(const uint8_t* codes, int Kpad, int bits, uint8_t* row) {
  std::memset(row, 0, RowBytes(Kpad, bits));
  for (int k = 0; k < Kpad; ++k) {
    const int c = codes[k];
    switch (bits) {
      case 8:
        row[k] = static_cast<uint8_t>(c);
        break;
      case 3:
        row[k / 4] |= static_cast<uint8_t>((c & 3) << (2 * (k % 4)));
        row[Kpad / 4 + k / 8] |= static_cast<uint8_t>(((c >> 2) & 1) << (k % 8));
        break;
      default: {
        const int per = 8 / bits;
        row[k / per] |= static_cast<uint8_t>(c << (bits * (k % per)));
      }
    }
  }
}

// IEEE binary16 bits -> float (portable, handles subnormals, inf and NaN).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static_assert(sizeof(uint16_t) == 2, "norms are stored as 2-byte float16");

}  // namespace formats
}  // namespace cqjax

#endif  // CQJAX_FORMATS_H_
