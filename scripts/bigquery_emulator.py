#!/usr/bin/env python3
"""Runs the local BigQuery emulator (PyPI `local-bigquery`, pinned by scripts/stack) offline.

As published, local-bigquery 0.4.0 needs DuckDB >= 2 and downloads the `icu`, `ducklake` and
`spatial` extensions at run time. This launcher makes it run with no network:
- DuckDB 1.5.5, whose `ducklake` and `spatial` extensions exist as PyPI wheels
  (`duckdb-extension-ducklake`, `duckdb-extension-spatial`); their files are copied into a local
  extension directory laid out as DuckDB expects (`<dir>/v<version>/<platform>/`), and every
  connection the emulator opens uses that directory with auto-install off;
- the time zone (`TimeZone = 'UTC'`) is set after connecting instead of in the connect config,
  where DuckDB would try to load `icu` first;
- only the REST API (no gRPC Storage API port), on the given host and port.

    bigquery_emulator.py --host 127.0.0.1 --port 59050 --data-dir .stack/bigquery/data \
        --extension-dir .stack/bigquery/extensions [--project fanout-local]

Tables persist in `--data-dir` (DuckLake files); `insertId` deduplication lasts 60 s, in
memory only (a restart forgets it).
"""

import argparse
import importlib.util
import pathlib
import shutil
import sys

import duckdb

EXTENSION_PACKAGES = ("duckdb_extension_ducklake", "duckdb_extension_spatial")


def prepare_extensions(ext_dir: pathlib.Path) -> None:
    """Copies the wheel-shipped extensions into `ext_dir/v<ver>/<platform>/` (idempotent)."""
    version = "v" + duckdb.__version__.lstrip("v")
    with duckdb.connect() as con:
        (platform,) = con.execute("PRAGMA platform").fetchone()
    target = ext_dir / version / platform
    target.mkdir(parents=True, exist_ok=True)
    for package in EXTENSION_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"bigquery_emulator: Python package {package} is not installed")
        root = pathlib.Path(list(spec.submodule_search_locations)[0])
        found = list((root / "extensions").glob(f"{version}/*.duckdb_extension"))
        if not found:
            sys.exit(f"bigquery_emulator: {package} has no extension for DuckDB {version}")
        for src in found:
            dst = target / src.name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, dst)


def patch_connect(ext_dir: pathlib.Path) -> None:
    """Every duckdb.connect of the emulator: local extensions, no download, UTC set after."""
    original = duckdb.connect

    def connect(database=":memory:", read_only=False, config=None, **kwargs):
        config = dict(config or {})
        tz = config.pop("TimeZone", None)
        config.setdefault("extension_directory", str(ext_dir))
        config.setdefault("autoinstall_known_extensions", False)
        con = original(database, read_only, config=config, **kwargs)
        if tz:
            con.execute(f"SET TimeZone = '{tz}'")
        return con

    duckdb.connect = connect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=59050)
    parser.add_argument("--data-dir", type=pathlib.Path, required=True)
    parser.add_argument("--extension-dir", type=pathlib.Path, required=True)
    parser.add_argument("--project", default="fanout-local")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    ext_dir = args.extension_dir.resolve()
    prepare_extensions(ext_dir)
    patch_connect(ext_dir)

    from local_bigquery.settings import settings

    settings.bigquery_host = args.host
    settings.bigquery_port = args.port
    settings.default_project_id = args.project
    settings.data_dir = args.data_dir.resolve()

    import uvicorn
    from local_bigquery import app

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
