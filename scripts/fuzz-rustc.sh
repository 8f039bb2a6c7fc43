#!/usr/bin/env bash
# The rustc wrapper of scripts/fuzz.sh (RUSTC_WRAPPER). It adds AFL++'s coverage instrumentation,
# the flags `cargo afl build` adds, to the crates that parse untrusted input (fuserl's own and
# the parsers they call: JSON, TOML, safetensors, tokenizers, minijinja, Parquet), links AFL++'s
# runtime into the harness binary, and builds the numeric stack (Burn, cubecl, gemm), which the
# fuzz targets link but never run, without optimisation, so that the harness builds in minutes.
set -euo pipefail
rustc=$1
shift
name=
prev=
for a in "$@"; do
    [ "$prev" = --crate-name ] && name=$a
    prev=$a
done
extra=()
case "$name" in
    fuserl_*)
        extra=(-C opt-level=2 -C debug-assertions -C overflow-checks -C codegen-units=1
            -C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3
            -C llvm-args=-sanitizer-coverage-trace-pc-guard -C llvm-args=-sanitizer-coverage-prune-blocks=0
            -C llvm-args=-sanitizer-coverage-trace-compares)
        ;;
    # Third-party parsers as fuserl ships them (the dev profile builds dependencies without
    # overflow checks or debug assertions), instrumented for coverage.
    serde_json | toml | toml_parser | toml_datetime | serde_spanned | safetensors | tokenizers | \
        minijinja | minijinja_contrib | parquet | half)
        extra=(-C opt-level=2 -C debug-assertions=off -C overflow-checks=off -C codegen-units=1
            -C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3
            -C llvm-args=-sanitizer-coverage-trace-pc-guard -C llvm-args=-sanitizer-coverage-prune-blocks=0
            -C llvm-args=-sanitizer-coverage-trace-compares)
        ;;
    burn* | cubecl* | gemm* | cubek* | burn_flex)
        extra=(-C opt-level=0)
        ;;
esac
if [ "$name" = fuserl_fuzz ] && [[ " $* " == *" --crate-type bin "* ]]; then
    extra+=(-C "link-arg=${FUSERL_AFL_RUNTIME:?scripts/fuzz.sh sets it}")
fi
exec "$rustc" "$@" "${extra[@]}"
