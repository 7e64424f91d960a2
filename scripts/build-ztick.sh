#!/bin/sh
# Build ztick (the Zig original) outside this repository, for bench/rest.py's ZTICK_BIN.
#
#   scripts/build-ztick.sh ZTICK_SRC DEPS_DIR
#
# Nothing is downloaded: this machine may not reach GitHub, so the sources must already be
# here, fetched by hand at the commits ztick's build.zig.zon pins:
#   ZTICK_SRC              a tree of ztick (git archive of awf-project/ztick)
#   DEPS_DIR/otel          zig-o11y/opentelemetry-sdk   60d797fc6420e3875e61cbb63b6008fcd6e3102a
#   DEPS_DIR/cli           sam701/zig-cli               cb44aade25a3c1eddd8b6f990b50c2189442c1e2
#   DEPS_DIR/proto         zig-o11y/opentelemetry-proto 2020e9690dd49869ca718c0fc148c2395ee7f849
#   DEPS_DIR/protobuf      Arwalk/zig-protobuf          622e9e84f6df66758718b1196e1ccd6dd45a8930
#   DEPS_DIR/zbench        hendriknielaender/zBench     2bdf0c62c5bf761d282e889e34fb33bc41484e6f
#   DEPS_DIR/zlib-1.3.1    madler/zlib                  tag v1.3.1
# e.g. git -C MIRROR archive COMMIT | tar -x -C DEPS_DIR/otel.
# ZIG is the zig >= 0.15.2 command (default: zig; `python -m ziglang` from the ziglang wheel
# works too).  Each dependency is put in zig's package cache with `zig fetch DIR`, which
# prints the content hash; the script stops unless it is the hash the build.zig.zon files
# pin (zlib is pinned by a legacy-format hash, which zig 0.15 no longer computes: its copy
# is placed under that name as it is).  zig-protobuf's build.zig asks for a protoc release
# zip (a lazy dependency) even though ztick's build never runs protoc (the generated code
# ships in opentelemetry-proto): a stub that fails loudly stands in for it, so a build
# that did need protoc would stop.  Prints the binary's path.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 ZTICK_SRC DEPS_DIR" >&2; exit 2; }
src=$(cd "$1" && pwd)
deps=$(cd "$2" && pwd)
ZIG=${ZIG:-zig}
cache=${ZIG_GLOBAL_CACHE_DIR:-$HOME/.cache/zig}/p

check() { # DIR EXPECTED-HASH
    got=$($ZIG fetch "$1")
    [ "$got" = "$2" ] || { echo "$1: hash $got, build.zig.zon pins $2" >&2; exit 1; }
    echo "ok $2"
}
check "$deps/otel" opentelemetry-0.0.1-U_uKJyFJDwDLwd8vv1ulDIoJKWYsLX_hEvebqryQzYdy
check "$deps/cli" cli-0.10.0-2eKe_5kEAQBeHqKxUHNTGnETzu81rqKWwT1WPt1jXBt0
check "$deps/proto" opentelemetry_proto-1.8.0-S4Y0u1CLAgDXe_ug407NZ8wQ3d0uyBG1Ezpbv9s5E7op
check "$deps/protobuf" protobuf-3.0.0-0e82avQuKADcHgDzDixSMGN22hzGEgwFE0tEJUWnWu5Q
check "$deps/zbench" zbench-0.11.2-YTdc7zolAQDlBF9i0ywXIvDjafL3Kg27S-aFUq6dU5zy

zlib=$cache/1220fed0c74e1019b3ee29edae2051788b080cd96e90d56836eea857b0b966742efb
[ -d "$zlib" ] || { mkdir -p "$zlib" && cp -R "$deps/zlib-1.3.1/." "$zlib/"; }

protoc=$cache/N-V-__8AAGKbngAmNuaBMSXq_WgmQi6N8WVWVKp0moFSTvoJ # protoc-32.1-linux-x86_64
if [ ! -d "$protoc" ]; then
    mkdir -p "$protoc/bin" "$protoc/include"
    printf '#!/bin/sh\necho "stub protoc (build-ztick.sh): not available here" >&2\nexit 1\n' \
        >"$protoc/bin/protoc"
    chmod +x "$protoc/bin/protoc"
fi

cd "$src"
$ZIG build -Doptimize=ReleaseFast
echo "$src/zig-out/bin/ztick"
