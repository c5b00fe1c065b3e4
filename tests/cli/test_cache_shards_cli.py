"""`cache migrate`, `cache merge`, `cache compact`: results on stdout (--json too), refusals as one line."""
import json
import sys
from pathlib import Path

import numpy as np

from helpers import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embedding"))
from test_shards_convert import content, v1_cache  # noqa: E402

from clipposter.embedding.cache import EmbeddingCache  # noqa: E402
from clipposter.embedding.cache_convert import SHARD_ROWS  # noqa: E402


def test_migrate_merge_compact_from_the_command_line(tmp_path, capsys):
    v1_cache(tmp_path / "v1")
    with EmbeddingCache.open(tmp_path / "v1", mode="r") as old:
        expected = content(old)
    code, out, err = run_cli(capsys, "cache", "migrate", "--cache", tmp_path / "v1", "--out", tmp_path / "v2",
                             "--shard-rows", 4, "--json")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert (summary["posters"], summary["records"], summary["shards"], summary["migrated"]) == (7, 7, 2, True)
    code, out, err = run_cli(capsys, "cache", "merge", tmp_path / "v2", tmp_path / "v2", "--out", tmp_path / "m")
    assert code == 0 and "merged 2 caches" in out and "4 shards, 7 posters" in out
    code, out, err = run_cli(capsys, "cache", "compact", "--cache", tmp_path / "m", "--json")
    assert code == 0 and json.loads(out)["shards"] == 1 and json.loads(out)["shards_before"] == 4
    with EmbeddingCache.open(tmp_path / "m", mode="r") as merged:
        assert content(merged) == {**expected}
        assert np.asarray(merged.image_matrix()).shape == (7, 8)


def test_refusals_are_one_line_naming_flags(tmp_path, capsys):
    v1_cache(tmp_path / "v1")
    code, out, err = run_cli(capsys, "cache", "merge", tmp_path / "v1", tmp_path / "v1", "--out", tmp_path / "m")
    assert code == 2 and err.count("\n") == 1 and "clipposter cache migrate" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, out, err = run_cli(capsys, "cache", "migrate", "--cache", tmp_path / "v1", "--out", tmp_path / "full")
    assert code == 2 and err.startswith("error: --out ") and err.count("\n") == 1
    code, out, err = run_cli(capsys, "cache", "compact", "--cache", tmp_path / "v1", "--shard-rows", 0)
    assert code == 2 and err == "error: --shard-rows must be at least 1, got 0\n"
    code, out, err = run_cli(capsys, "cache", "compact", "--cache", tmp_path / "v1")
    assert code == 2 and "clipposter cache migrate" in err


def test_the_default_shard_rows_flag_is_the_library_default(capsys):
    from clipposter.cli.main import build_parser

    args = build_parser().parse_args(["cache", "compact", "--cache", "x"])
    assert args.shard_rows == SHARD_ROWS
