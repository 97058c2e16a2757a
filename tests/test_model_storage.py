"""Models in object storage: a folder on S3 (moto) loads through the same from_pretrained path as a local one."""

from __future__ import annotations

import pytest
import torch

from raykd import storage
from raykd.errors import UserError
from raykd.models.cross_encoder import CrossEncoder
from raykd.models.registry import load_scorer


def test_cross_encoder_from_s3_scores_like_the_local_copy(tiny_models, s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    local = tiny_models("bert", "cross_encoder")
    names = storage.upload_dir(local, storage.join(s3_uri, "teacher"))
    assert "config.json" in names
    q, p = ["gomu teto", "tepe piba"], ["gomu teto lize", "voso simi"]
    want = CrossEncoder.from_pretrained(local).score(q, p)
    got = CrossEncoder.from_pretrained(storage.join(s3_uri, "teacher")).score(q, p)
    torch.testing.assert_close(got, want)
    again = load_scorer(storage.join(s3_uri, "teacher")).score(q, p)  # cached copy, same model
    torch.testing.assert_close(again, want)
    with pytest.raises(UserError, match="does not exist in object storage"):
        CrossEncoder.from_pretrained(storage.join(s3_uri, "missing"))
