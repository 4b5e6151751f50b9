"""Compile every ragged-attention kernel variant that bench_serving_kernel.py launches for sm_90, without a GPU.

Triton's NVIDIA backend compiles to a cubin on any machine; this reports registers, spill stack and shared memory
per variant and fails (exit 1) when one needs more shared memory than an H100/H200 block may have (232448 bytes)
or does not compile. Run it before spending GPU time:

    python benchmarks/check_ragged_compile.py            # with the installed triton
    pip install --target /tmp/t36 --no-deps triton==3.6.0 && \
        PYTHONPATH=/tmp/t36 python benchmarks/check_ragged_compile.py   # with the GPU machine's triton (~4 min)
    python benchmarks/check_ragged_compile.py combine    # only the variants whose name contains "combine"
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compactor.kernels.ragged_attention as m  # noqa: E402
from bench_serving_kernel import check_cases  # noqa: E402

SHARED_LIMIT = 232448  # bytes per block on sm_90 (227 KB)
TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TY = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
CODEC = {"16": 0, "lloyd": 1, "q8_0": 2, "q4_0": 3}


def compile_one(fn, types, consts, div16, warps, stages):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    # what triton's JIT specialises at launch: 16-byte aligned pointers, integers divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n in div16)}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def resources(k):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    txt = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    reg = re.findall(r"REG:(\d+)", txt)
    stack = re.findall(r"STACK:(\d+)", txt)
    return int(reg[0]) if reg else -1, int(stack[0]) if stack else -1, k.metadata.shared


def codec_parts(label):
    """'16', 'K4V4', 'q4_0', 'K4Vq4_0', ... -> ((codec id, bits) for keys, for values)."""
    if label in ("16", "q4_0", "q8_0"):
        return (CODEC[label], 8), (CODEC[label], 8)
    mk = re.fullmatch(r"K(\d|q8_0|q4_0)V(\d|q8_0|q4_0)", label)

    def one(p):
        return (CODEC[p], 8) if p.startswith("q") else (1, int(p))

    return one(mk.group(1)), one(mk.group(2))


def partial_variant(qty, label, d, B, G, Lq, L_app, mask, block_n=None, stages=None):
    (kc, kb), (vc, vb) = codec_parts(label)
    bm, bn, _, warps, st = m._pick_config(B * G * Lq, 1000, 8, d, m.torch.device("cpu"), None, block_n, None,
                                          wide=qty == "fp32")
    BD = max(16, m._next_pow2(d))
    data = {0: "*" + TY[qty], 1: "*u8", 2: "*i8", 3: "*u8"}
    types = dict(Q="*" + TY[qty], QROT="*fp32", KROT="*fp32", CNT="*i32", VMEAN="*fp16", VROT="*fp32",
                 OUT="*" + TY[qty], OFFS="*i32", BETA="*fp32", KX=data[kc],
                 KS="*fp16" if kc >= 2 else data[kc], KGAIN="*fp16", KMEAN="*fp16", KCENT="*fp32", VX=data[vc],
                 VS="*fp16" if vc >= 2 else data[vc], VGAIN="*fp16", VCENT="*fp32", EK="*fp32", EV="*fp32",
                 EBETA="*fp32", AK="*" + TY[qty], AV="*" + TY[qty], AMASK="*i8" if mask else "*fp32", PM="*fp32",
                 PL="*fp32", PACC="*fp32", qk_scale2="fp32", rot_scale="fp32")
    for n in ("s_qb", "s_qh", "s_qi", "s_rb", "s_rh", "s_ri", "k_stride", "v_stride", "s_km", "s_akb", "s_akh",
              "s_akl", "s_avb", "s_avh", "s_avl", "s_mb", "s_vm", "s_ob", "s_oi", "s_oh"):
        types[n] = "i64"
    row = {0: d, 1: None, 2: d // 32 * 34, 3: d // 32 * 18}
    div16 = {"s_qb", "s_qh", "s_qi", "s_rb", "s_rh", "s_ri", "s_km", "s_akb", "s_akh", "s_akl", "s_avb", "s_avh",
             "s_avl", "s_ob", "s_oi", "s_oh"} if d % 16 == 0 else set()
    for name, c, b in (("k_stride", kc, kb), ("v_stride", vc, vb)):
        stride = row[c] if c != 1 else (d * b + 7) // 8
        if stride % 16 == 0:
            div16.add(name)
    M_all = B * G * Lq
    fused = m._fuse_merge(1, -(-M_all // bm), B)
    hadamard = m._uses_hadamard(d)
    dtype = {"bf16": m.torch.bfloat16, "fp16": m.torch.float16, "fp32": m.torch.float32}[qty]
    k_had, v_had = kc == 1 and hadamard, vc == 1 and hadamard
    lut = m._uses_lut(dtype, False)
    fm, fs, fc = m._combine_config(M_all, BD, vc == 1 and not v_had, fused_rows=bm)
    swap = m._uses_swap(bm, d, dtype)
    rot_in = kc == 1 and not k_had and m._ROTATE == "prologue" and d <= 128
    consts = dict(G=G, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, BLOCK_H=8, K_CODEC=kc, K_BITS=kb, V_CODEC=vc,
                  V_BITS=vb, SELECT=m._LLOYD_SELECT, HAS_MASK=mask, UPCAST=False, DOT_PRECISION="tf32",
                  ROT_IN=rot_in, ROT_PRECISION="tf32x3", LUT=lut, K_HAD=k_had, V_HAD=v_had, SPLIT=True,
                  FUSED=fused, CM=fm, CS=fs, CC=fc, SWAP=swap, FWHT=m._FWHT,
                  PDL=m._PDL, PRE_STAGES=stages or m._prefix_stages(swap, st),
                  **dict(zip(("PREFETCH", "K_PRE", "V_PRE"), m._prefetch_flags(bm, kc, vc))))
    name = (f"partial {label:8s} q={qty} d={d} G={G} bm={bm} bn={bn} w={warps} st={stages or st}"
            f"{' mask' if mask else ''}{' fused' if fused else ''}{' rot' if rot_in else ''}"
            f"{' had' if k_had or v_had else ''}{' swap' if swap else ''}"
            f"{' lut' if lut and 4 in (kb, vb) and 1 in (kc, vc) else ''}")
    return name, (m._partial_kernel, types, consts, div16, warps, stages or st)


def main():
    variants = {}
    for label, lens, d, B, G, Lq, L_app, pad, qdtype, stored in check_cases(False):
        qty = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(qdtype)]
        n, v = partial_variant(qty, label, d, B, G, Lq, L_app, pad)
        variants[n] = v
    for label in ("16", "K4V4", "q4_0"):
        for B, Lq in ((1, 1), (8, 1), (1, 256)):
            n, v = partial_variant("bf16", label, 128, B, 4, Lq, 64, False)
            variants[n] = v
        for bn, st in ((32, 2), (64, 2), (128, 2), (64, 3)):
            n, v = partial_variant("bf16", label, 128, 1, 4, 1, 64, False, block_n=bn, stages=st)
            variants[n] = v
    for d in sorted({c[2] for c in check_cases(False)} | {128}):
        BD = max(16, m._next_pow2(d))
        for qty in ("bf16", "fp16", "fp32"):
            types = dict(Q="*" + TY[qty], ROT="*fp32", QROT="*fp32", s_qb="i64", s_qh="i64", s_qi="i64")
            variants[f"rotate q={qty} d={d}"] = (m._rotate_kernel, types, dict(D=d, BLOCK_M=16, BLOCK_D=BD,
                                                                               BLOCK_C=m._rot_cols(BD)),
                                                 {"s_qb", "s_qh", "s_qi"}, 8, 2)
        for M_all in (4, 32, 1024):
            for vl in (False, True):
                cm, cs, cc = m._combine_config(M_all, BD, vl)
                types = dict(PM="*fp32", PL="*fp32", PACC="*fp32", OFFS="*i32", VMEAN="*fp16", ROT="*fp32",
                             OUT="*bf16", s_vm="i64", s_ob="i64", s_oi="i64", s_oh="i64")
                variants[f"combine d={d} rows={cm} lloyd={vl}"] = (
                    m._combine_kernel, types, dict(G=4, D=d, BLOCK_M=cm, BLOCK_D=BD, BLOCK_C=cc, BLOCK_S=cs,
                                                   BLOCK_H=8, V_LLOYD=vl, ROT_PRECISION="tf32x3", PDL=m._PDL),
                    {"s_ob", "s_oi", "s_oh"}, 8, 2)
    only = sys.argv[1] if len(sys.argv) > 1 else ""  # optional substring filter, e.g. "combine"
    variants = {k: v for k, v in variants.items() if only in k}
    print(f"triton {triton.__version__}, target sm_90, {len(variants)} variants")
    bad = 0
    for name, args in variants.items():
        try:
            regs, stack, shared = resources(compile_one(*args))
        except Exception as exc:  # a variant that does not compile is a failure
            bad += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        flag = "" if shared <= SHARED_LIMIT else "  <-- SHARED MEMORY OVER THE LIMIT"
        if stack > 0:
            flag += f"  (spills: {stack} B stack)"
        bad += shared > SHARED_LIMIT
        print(f"{name:64s} regs {regs:3d}  stack {stack:5d}  shared {shared:6d}{flag}")
    print("OK" if not bad else f"{bad} variant(s) failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
