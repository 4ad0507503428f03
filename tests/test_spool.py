"""bridge.spool: entries appear whole or not at all, carry their thumbnails and asset metadata,
survive a restart, sync later, and an entry that is not whole is discarded (the job is generated
again)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bridge.spool import JobOutputs, OutputAsset, Spool, SpoolError
from job_outputs import USER, VIDEO_FPS, VIDEO_FRAMES, image_outputs, new_job_id, png, video_outputs, webp_size


@pytest.fixture()
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool")


def test_spool_save_load_remove(spool):
    job = new_job_id()
    outputs = image_outputs(count=2)
    entry = spool.save(job, outputs)
    assert sorted(p.name for p in entry.directory.iterdir()) == [
        "0.png", "0.thumb.webp", "1.png", "1.thumb.webp", "manifest.json"]
    loaded = Spool(spool.directory).load(job)
    assert loaded == entry
    assert [a.read_bytes() for a in loaded.assets] == [a.data for a in outputs.assets]
    assert loaded.metadata == outputs.metadata and loaded.user_id == USER and loaded.job_type == "sdxl_image_fast"
    assert loaded.assets[1].metadata["seed"] == 1001
    assert spool.pending() == [job]
    assert [p.name for p in spool.directory.iterdir()] == [job]  # no temporary folders left

    spool.save(job, video_outputs())  # replaces the entry
    assert [a.filename for a in spool.load(job).assets] == ["0.mp4"]
    assert sorted(p.name for p in (spool.directory / job).iterdir()) == ["0.mp4", "0.thumb.webp", "manifest.json"]

    spool.remove(job)
    assert spool.load(job) is None and spool.pending() == [] and list(spool.directory.iterdir()) == []
    spool.remove(job)  # idempotent


def test_spool_entry_without_manifest_is_not_an_entry(spool):
    (spool.directory / "half-written").mkdir(parents=True)
    (spool.directory / "half-written" / "0.png").write_bytes(b"x")
    assert spool.load("half-written") is None and spool.pending() == []


def test_spool_save_without_fsync_then_sync(spool, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    job = new_job_id()
    entry = spool.save(job, image_outputs(count=2), durable=False)
    assert synced == [] and spool.has(job) and spool.load(job) == entry  # whole already, not yet synced
    spool.sync(job)
    names = {Path(path).name for path in synced}
    assert {"0.png", "0.thumb.webp", "1.png", "1.thumb.webp", "manifest.json", job, spool.directory.name} <= names
    spool.remove(job)
    spool.sync(job)  # removed meanwhile: nothing to do
    assert not spool.has(job)


def test_spool_entry_that_is_not_whole_is_discarded(spool, caplog):
    truncated, garbled = new_job_id(), new_job_id()
    entry = spool.save(truncated, image_outputs(count=2))
    entry.assets[1].path.write_bytes(entry.assets[1].path.read_bytes()[:10])  # a power cut before sync
    spool.save(garbled, image_outputs(count=1))
    (spool.directory / garbled / "manifest.json").write_bytes(b'{"version": 1, "job_')
    with caplog.at_level("WARNING"):
        assert spool.load(truncated) is None and spool.load(garbled) is None
    assert "1.png has 10 bytes" in caplog.text and "unreadable manifest" in caplog.text
    assert spool.pending() == [] and not spool.has(truncated) and not spool.has(garbled)


def test_spool_unwritable_directory_raises_spool_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool folder should be")
    spool = Spool(blocker / "spool")
    with pytest.raises(SpoolError) as info:
        spool.save(new_job_id(), image_outputs(count=1))
    assert str(blocker / "spool") in str(info.value) and "Not a directory" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_spool_read_only_directory_raises_spool_error(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        with pytest.raises(SpoolError, match="Permission denied"):
            Spool(directory).save(new_job_id(), image_outputs(count=1))
    finally:
        directory.chmod(0o700)


def test_spool_refuses_bad_ids_and_outputs(spool):
    with pytest.raises(ValueError, match="job_id '../escape'"):
        spool.save("../escape", image_outputs(count=1))
    bad_user = JobOutputs(user_id="a/b", job_type="x", assets=image_outputs(1).assets)
    with pytest.raises(ValueError, match="user_id 'a/b'"):
        spool.save(new_job_id(), bad_user)
    no_seed = JobOutputs(USER, "x", [OutputAsset("image", png(8, 8), {"steps": 1})])
    with pytest.raises(ValueError, match="lacks"):
        spool.save(new_job_id(), no_seed)
    not_png = JobOutputs(USER, "x", [OutputAsset("image", b"GIF89a", image_outputs(1).assets[0].metadata)])
    with pytest.raises(ValueError, match="not a PNG"):
        spool.save(new_job_id(), not_png)
    assert not spool.directory.exists() or list(spool.directory.iterdir()) == []


def test_thumbnails_and_asset_metadata_are_made_when_saved(spool):
    """The report needs no decoding: each asset's thumbnail and docs/APP_CONTRACT.md §4 metadata are in the entry."""
    job = new_job_id()
    outputs = image_outputs(count=2, width=640, height=360)
    entry = spool.save(job, outputs)
    for index, asset in enumerate(entry.assets):
        assert asset.thumbnail == f"{index}.thumb.webp" and webp_size(asset.thumbnail_path.read_bytes()) == (256, 144)
        assert asset.metadata == {**outputs.assets[index].metadata, "batch_size": 2, "format": "png", "width": 640,
                                  "height": 360, "file_size_bytes": len(outputs.assets[index].data),
                                  "asset_index": index}
    video = spool.save(new_job_id(), video_outputs()).assets[0]
    assert video.metadata["format"] == "mp4" and (video.metadata["width"], video.metadata["height"]) == (320, 192)
    assert video.metadata["duration_seconds"] == VIDEO_FRAMES / VIDEO_FPS
    grey = np.asarray(Image.open(io.BytesIO(video.thumbnail_path.read_bytes())).convert("L"), dtype=float).mean()
    assert abs(grey - 100) < 6  # the middle frame (frame i is grey 25 * i)


def test_entry_without_thumbnails_or_with_one_missing_is_discarded(spool, caplog):
    """An entry from before thumbnails were spooled, or one whose thumbnail did not reach the disk,
    is not whole: the job is generated again rather than reported without thumbnails."""
    older, missing = new_job_id(), new_job_id()
    spool.save(older, image_outputs(count=1))
    manifest_path = spool.directory / older / "manifest.json"
    manifest = json.loads(manifest_path.read_bytes())
    for item in manifest["assets"]:
        del item["thumbnail"], item["thumbnail_size"]
    manifest_path.write_text(json.dumps({**manifest, "version": 1}))
    entry = spool.save(missing, image_outputs(count=2))
    entry.assets[1].thumbnail_path.unlink()
    with caplog.at_level("WARNING"):
        assert spool.load(older) is None and spool.load(missing) is None
    assert "lacks 'thumbnail'" in caplog.text and "1.thumb.webp is missing" in caplog.text
    assert spool.pending() == []


def test_an_image_that_does_not_decode_is_refused_with_its_index(spool):
    metadata = image_outputs(1).assets[0].metadata
    broken = JobOutputs(USER, "x", [OutputAsset("image", png(8, 8), metadata),
                                    OutputAsset("image", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, metadata)])
    with pytest.raises(ValueError, match="image asset 1 cannot be decoded"):
        spool.save(new_job_id(), broken)
    assert not spool.directory.exists() or list(spool.directory.iterdir()) == []


def test_a_models_preview_is_the_thumbnail_and_the_file_is_not_decoded(spool, monkeypatch):
    """With the model's preview, the spool reads only the file's header (width, height)."""
    import model_kit.media
    from PIL import ImageFile

    preview = model_kit.media.thumbnail_webp(Image.new("RGB", (48, 27), (200, 10, 10)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the file was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(model_kit.media, "video_middle_frame", no_decoding)
    image = image_outputs(count=1, width=640, height=360).assets[0]
    video = video_outputs().assets[0]
    for asset, size in ((image, (640, 360)), (video, (320, 192))):
        entry = spool.save(new_job_id(), JobOutputs(USER, "x", [OutputAsset(asset.type, asset.data, asset.metadata,
                                                                             preview)]))
        [spooled] = entry.assets
        assert spooled.thumbnail_path.read_bytes() == preview
        assert (spooled.metadata["width"], spooled.metadata["height"]) == size


def test_a_preview_that_is_not_a_webp_is_refused(spool):
    asset = image_outputs(count=1).assets[0]
    with pytest.raises(ValueError, match="image asset 0: its preview is not a WEBP"):
        spool.save(new_job_id(), JobOutputs(USER, "x", [OutputAsset("image", asset.data, asset.metadata, png(8, 8))]))
