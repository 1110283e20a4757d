// AVX-512 VNNI body of the CQ lookup-matmul, included twice by cq_x86.cc:
// CQ512_VBMI=0 (vpshufb decode) and CQ512_VBMI=1 (vpermb decode, no masks),
// each under its own target attribute CQ512_TARGET and namespace CQ512_NS.
namespace CQ512_NS {


CQ512_TARGET inline void NormsToFloat512(const uint16_t* h, int nb, float* out) {
  int j = 0;
  for (; j + 16 <= nb; j += 16) {
    _mm512_storeu_ps(out + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + j))));
  }
  if (j < nb) {
    const __mmask16 m = static_cast<__mmask16>((1u << (nb - j)) - 1);
    _mm512_mask_storeu_ps(out + j, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + j)));
  }
}

// Byte-mask shuffle of a 16-entry table broadcast to every 128-bit lane.
CQ512_TARGET inline __m512i Lut512(const uint8_t* lut16) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut16)));
}

// REG (nb <= 16): the per-(row, block) scales norm * fx live in one register
// per activation row and each chunk permutes its lanes' scales out of it; the
// general path goes through memory (scalar stores then a vector load per chunk,
// which stalls on store forwarding: a large cost on the short rows of K <= 2048).
template <int BITS, int MB, bool REG>
CQ512_TARGET void Rows512(const Plan& p, const Prepared& q, const uint8_t* codes,
                       const uint16_t* norms, int n0, int n1, int m0, float* y, int N,
                       float* nf, float* wsc) {
  constexpr int LB = BITS == 3 ? 2 : BITS;
  constexpr int PER = 8 / LB;
  const int nb = p.nblocks, nch = p.nchunks, W = nb + 16;
  const size_t xstride = static_cast<size_t>(nch) * PER * 64;
  const int tail = p.plane_bytes - (nch - 1) * 64;  // 1..64
  const __mmask64 tmask = tail >= 64 ? ~__mmask64{0} : ((__mmask64{1} << tail) - 1);
  const __mmask32 hmask = tail >= 64 ? ~__mmask32{0} : ((__mmask32{1} << (tail / 2)) - 1);
  const __m512i low = _mm512_set1_epi8(static_cast<char>((1 << LB) - 1));
  const __m512i four = _mm512_set1_epi8(4);
  const __m512i nib = _mm512_set1_epi16(0x0F);
  const __m512i nibhi = _mm512_set1_epi16(0x0F00);
  const int8_t* xr = q.xr.data() + m0 * xstride;
  const int32_t* bias = q.bias.data() + static_cast<size_t>(m0) * nch * 16;
  // raw pointers, so that the hot loop keeps them in registers
  const int32_t* lut_first = p.lut_first.data();
  const int32_t* lut_count = q.lut_count_eff.data();
  const int32_t* lut_block = p.lut_block.data();
  const uint64_t* lut_mask = p.lut_mask.data();
  const int32_t* lane_block = p.lane_block.data();
  const int32_t* chunk_b0 = p.chunk_b0.data();
  const uint8_t* lut16 = q.lut.data();
  const uint8_t* lut64 = q.lut64.data();
  const float* fxall = q.fx.data();
  const size_t row_bytes = p.row_bytes;
  const int hi_offset = p.hi_offset;
  const __mmask16 nbmask = static_cast<__mmask16>(nb >= 16 ? 0xFFFF : (1u << nb) - 1);
  __m512 fxv[MB];
  if (REG) {
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) fxv[mi] = _mm512_maskz_loadu_ps(nbmask, fxall + static_cast<size_t>(m0 + mi) * nb);
  }

  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    __m512 wreg[MB];
    if (REG) {
      const __m512 nfv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(nbmask, norms + static_cast<size_t>(n) * nb));
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) wreg[mi] = _mm512_mul_ps(nfv, fxv[mi]);
    } else {
      NormsToFloat512(norms + static_cast<size_t>(n) * nb, nb, nf);
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) {
        const float* fx = fxall + static_cast<size_t>(m0 + mi) * nb;
        float* w = wsc + mi * W;
        for (int j = 0; j < nb; ++j) w[j] = nf[j] * fx[j];
      }
    }
    __m512 facc[MB];
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) facc[mi] = _mm512_setzero_ps();
    for (int c = 0; c < nch; ++c) {
      const bool last = c == nch - 1;
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m512i v = last ? _mm512_maskz_loadu_epi8(tmask, row + c * 64)
                             : _mm512_loadu_si512(row + c * 64);
      __m512i e = _mm512_setzero_si512();
      if (BITS == 3) {
        const uint8_t* hp = row + hi_offset + c * 32;
        const __m256i h = last ? _mm256_maskz_loadu_epi8(hmask, hp)
                               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hp));
        const __m512i h16 = _mm512_cvtepu8_epi16(h);
        e = _mm512_or_si512(_mm512_and_si512(h16, nib),
                            _mm512_and_si512(_mm512_slli_epi16(h16, 4), nibhi));
      }
      __m512i acc[MB];
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) {
        acc[mi] = _mm512_loadu_si512(bias + (static_cast<size_t>(mi) * nch + c) * 16);
      }
      const int lf = lut_first[c];
      const int nl = lut_count[c];
      const __m512i lut0 = Lut512(lut16 + lut_block[lf] * 16);
#if CQ512_VBMI
      // vpermb reads only the low 6 bits of each index byte and the 64-byte
      // table repeats the levels (t[i] = lut[i % 2^bits]): no mask needed.
      if (BITS != 3) {
        const __m512i t0 = _mm512_loadu_si512(lut64 + lut_block[lf] * 64);
#pragma GCC unroll 8
        for (int f = 0; f < PER; ++f) {
          const __m512i idx = f == 0 ? v : _mm512_srli_epi16(v, f * LB);
          __m512i wv = _mm512_permutexvar_epi8(idx, t0);
          for (int t = 1; t < nl; ++t) {
            wv = _mm512_mask_permutexvar_epi8(
                wv, lut_mask[lf + t], idx,
                _mm512_loadu_si512(lut64 + lut_block[lf + t] * 64));
          }
          const int8_t* xp = xr + (static_cast<size_t>(c) * PER + f) * 64;
          #pragma GCC unroll 8
          for (int mi = 0; mi < MB; ++mi) {
            acc[mi] = _mm512_dpbusd_epi32(acc[mi], wv, _mm512_loadu_si512(xp + mi * xstride));
          }
        }
      } else
#endif
#pragma GCC unroll 8
      for (int f = 0; f < PER; ++f) {
        __m512i idx = _mm512_and_si512(_mm512_srli_epi16(v, f * LB), low);
        if (BITS == 3) {
          __m512i hb = f == 0   ? _mm512_slli_epi16(e, 2)
                       : f == 1 ? _mm512_slli_epi16(e, 1)
                       : f == 2 ? e
                                : _mm512_srli_epi16(e, 1);
          idx = _mm512_or_si512(idx, _mm512_and_si512(hb, four));
        }
        __m512i wv = _mm512_shuffle_epi8(lut0, idx);
        for (int t = 1; t < nl; ++t) {
          wv = _mm512_mask_shuffle_epi8(wv, lut_mask[lf + t],
                                        Lut512(lut16 + lut_block[lf + t] * 16), idx);
        }
        const int8_t* xp = xr + (static_cast<size_t>(c) * PER + f) * 64;
        #pragma GCC unroll 8
        for (int mi = 0; mi < MB; ++mi) {
          acc[mi] = _mm512_dpbusd_epi32(acc[mi], wv, _mm512_loadu_si512(xp + mi * xstride));
        }
      }
      const __m512i li = _mm512_loadu_si512(lane_block + c * 16);
      const int b0 = chunk_b0[c];
      const __m512i lia = _mm512_add_epi32(li, _mm512_set1_epi32(b0));
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) {
        const __m512 s = REG ? _mm512_permutexvar_ps(lia, wreg[mi])
                             : _mm512_permutexvar_ps(li, _mm512_loadu_ps(wsc + mi * W + b0));
        facc[mi] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[mi]), s, facc[mi]);
      }
    }
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) {
      y[static_cast<size_t>(m0 + mi) * N + n] = _mm512_reduce_add_ps(facc[mi]);
    }
  }
}

template <int BITS>
CQ512_TARGET void Dispatch512(const Plan& p, const Prepared& q, const uint8_t* codes,
                           const uint16_t* norms, int n0, int n1, float* y, int N) {
  const int nb = p.nblocks;
  std::vector<float> nf(nb + 16, 0.0f), wsc(static_cast<size_t>(kMaxMB512) * (nb + 16), 0.0f);
  const bool reg = nb <= 16;
  for (int m0 = 0; m0 < q.M; m0 += kMaxMB512) {
#define CQ512_ROWS(MB_)                                                                        \
  (reg ? Rows512<BITS, MB_, true>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()) \
       : Rows512<BITS, MB_, false>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()))
    switch (std::min(kMaxMB512, q.M - m0)) {
      case 1: CQ512_ROWS(1); break;
      case 2: CQ512_ROWS(2); break;
      case 3: CQ512_ROWS(3); break;
      case 4: CQ512_ROWS(4); break;
      case 5: CQ512_ROWS(5); break;
      case 6: CQ512_ROWS(6); break;
      case 7: CQ512_ROWS(7); break;
      default: CQ512_ROWS(8);
    }
#undef CQ512_ROWS
  }
}


inline void Rows(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                 const uint16_t* norms, int n0, int n1, float* y, int N) {
  switch (plan.bits) {
    case 1: return Dispatch512<1>(plan, prep, codes, norms, n0, n1, y, N);
    case 2: return Dispatch512<2>(plan, prep, codes, norms, n0, n1, y, N);
    case 3: return Dispatch512<3>(plan, prep, codes, norms, n0, n1, y, N);
    default: return Dispatch512<4>(plan, prep, codes, norms, n0, n1, y, N);
  }
}

}  // namespace CQ512_NS
