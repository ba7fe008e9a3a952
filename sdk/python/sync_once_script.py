#!/usr/bin/env python3
"""Copies the exactly-once Lua script of sdk/src/exactly_once.rs (`pub const SCRIPT`) into
fanout_sdk/_once_script.py, byte for byte. `--check` only compares (exit 1 when they differ):
scripts/build-python-plugins and the SDK's tests run it, so the two SDKs never drift."""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
RUST = HERE.parent / "src" / "exactly_once.rs"
COPY = HERE / "fanout_sdk" / "_once_script.py"
START = 'pub const SCRIPT: &str = r#"'
END = '"#;'


def rust_script(path=RUST):
    text = path.read_text(encoding="utf-8")
    at = text.index(START) + len(START)
    return text[at:text.index(END, at)]


def render(script):
    return ('"""The exactly-once Lua script, copied byte for byte from sdk/src/exactly_once.rs by\n'
            'sdk/python/sync_once_script.py (do not edit; run it after changing the Rust one)."""\n\n'
            "SCRIPT = %r\n" % script)


def main():
    want = render(rust_script())
    have = COPY.read_text(encoding="utf-8") if COPY.exists() else None
    if "--check" in sys.argv:
        if have != want:
            print("sync_once_script: %s differs from %s: run sdk/python/sync_once_script.py"
                  % (COPY, RUST), file=sys.stderr)
            return 1
        return 0
    if have != want:
        COPY.write_text(want, encoding="utf-8")
        print("sync_once_script: wrote", COPY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
