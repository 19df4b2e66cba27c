"""Record formats and the lazy index."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from lora_manip.data import records as R
from lora_manip.data.dataset import ConcatSamples, IndexedSamples, build_datasets
from lora_manip.data.records import RecordIndex, load_samples, to_sample
from lora_manip.errors import UserError
from lora_manip.recipe import DataCfg, DatasetCfg

RECORDS = [
    {"id": "list", "images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image><image> Same scene?"}, {"from": "gpt", "value": "Yes"}]},
    {"id": "string", "images": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cube"}]},
    {"id": "llava_key", "image": "b.png", "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red"},
        {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "Cube"}]},
    {"id": 7, "conversations": [
        {"from": "user", "value": "Plan: put the cup away — ünïcödé 日本"},
        {"from": "assistant", "value": "ok"}]},
]


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    (tmp_path / "r.json").write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "r.jsonl").write_text("\n\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n",
                                      encoding="utf-8")
    return tmp_path


def test_json_and_jsonl_give_the_same_samples(folder):
    a, pa = load_samples(folder / "r.json", folder)
    b, pb = load_samples(folder / "r.jsonl", folder)
    assert pa == pb == []
    assert [(s.id, s.messages, s.images) for s in a] == [(s.id, s.messages, s.images) for s in b]
    assert [len(s.images) for s in a] == [2, 1, 1, 0]
    assert a[0].images == [str(folder / "a.png"), str(folder / "b.png")]
    assert a[2].messages[0] == {"role": "system", "content": "Be brief."} and len(a[2].messages) == 5
    assert a[3].id == "7"
    starts = [n for n, line in enumerate((folder / "r.json").read_text().splitlines(), 1) if line == "  {"]
    assert a[1].source.endswith(f"r.json index 1 (line {starts[1]})")
    assert b[1].source.endswith("r.jsonl line 3")  # blank lines keep their numbers


def test_index_holds_offsets_not_records(folder):
    for name in ("r.json", "r.jsonl"):
        ix = RecordIndex(folder / name)
        assert len(ix) == 4 and ix.nbytes == 16 * 4
        held = [v for k, v in vars(ix).items() if k not in ("path", "kind", "problems", "complete", "_fd", "_pid")]
        assert all(isinstance(v, np.ndarray) for v in held), held
        assert [ix.read(i) for i in range(len(ix))] == RECORDS
        clone = pickle.loads(pickle.dumps(ix))  # DataLoader workers
        assert clone.read(3) == RECORDS[3]


@pytest.mark.parametrize("chunk", [5, 64, 4096])
def test_json_array_index_across_buffer_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(R, "_CHUNK", chunk)
    recs = [{"id": i, "t": "é日" * (i % 7) + "x" * (i * 13 % 50), "n": [i, 1.5e-3, True, None]} for i in range(60)]
    (tmp_path / "a.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    ix = RecordIndex(tmp_path / "a.json")
    assert ix.problems == [] and [ix.read(i) for i in range(len(ix))] == recs


def test_dataset_keeps_lazy_views(synth_dir, processor):
    train = [DatasetCfg(annotation_path=str(synth_dir / "train.json"), data_path=str(synth_dir))]
    ds, _ = build_datasets(DataCfg(train=train, model_max_length=4096), processor, seed=0)
    assert isinstance(ds.samples, ConcatSamples)
    assert all(isinstance(p, IndexedSamples) for p in ds.samples.parts)
    assert ds.lengths.dtype == np.int32 and ds.has_images.dtype == bool and ds.has_images.all()
    samples, _ = load_samples(synth_dir / "train.json", synth_dir)
    assert ds.samples[5].messages == samples[5].messages and ds[5]["id"] == samples[5].id


def test_malformed_jsonl_line_is_reported_and_the_rest_read(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2,, }\n{"id": 3}\n')
    ix = RecordIndex(tmp_path / "a.jsonl")
    got = [ix.read(i) for i in range(len(ix))]
    assert got[0] == {"id": 1} and got[2] == {"id": 3}
    assert isinstance(got[1], R.Problem) and got[1].where == "line 2" and got[1].kind == "malformed_json"
    with pytest.raises(UserError, match="a.jsonl line 2 .*malformed JSON"):
        R.read_raw_records(tmp_path / "a.jsonl")


def test_malformed_json_array_names_its_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"id": 1},\n {"id": 2\n {"id": 3}\n]')
    ix = RecordIndex(tmp_path / "a.json")
    assert not ix.complete and len(ix) == 1
    (p,) = ix.problems
    assert p.where == "line 4" and "malformed JSON" in p.reason


def test_structure_problems_name_field_and_kind():
    def check(raw):
        return to_sample(raw, "f.json", "index 0", "/data")

    p = check({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]})
    assert p.field == "conversations[0].from" and "unknown speaker" in p.reason and p.record_id == "x"
    p = check({"id": "x", "conversations": [{"from": "system", "value": "s"}]})
    assert p.kind == "empty_conversation"
    p = check({"conversations": []})
    assert p.field == "id" and p.reason == "missing"
    p = check({"id": "x", "images": [3], "conversations": []})
    assert p.field == "images"


def test_the_pre_training_scan_is_cached_and_invalidated(tmp_path, processor, synth_dir, monkeypatch):
    """A restart reads lengths from the cache; a changed annotation file or processor setting scans again."""
    import copy
    import shutil

    import lora_manip.data.scan_cache as sc
    from lora_manip.data.processor import cap_image_tiles

    monkeypatch.setenv("LORA_MANIP_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d"
    shutil.copytree(synth_dir, data)
    calls = []
    real = sc.scan
    monkeypatch.setattr(sc, "scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = DataCfg(train=[DatasetCfg(annotation_path=str(data / "train.json"), data_path=str(data))],
                  model_max_length=4096)

    def build(proc=processor):
        return build_datasets(cfg, proc, seed=0)[0]

    first = build()
    assert len(calls) == 1 and list((tmp_path / "cache" / "scan").glob("*.npz"))
    again = build()
    assert len(calls) == 1  # from the cache
    assert np.array_equal(again.lengths, first.lengths) and np.array_equal(again.tiles, first.tiles)
    records = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(records[:-1]))  # the file's content changed
    assert len(build()) == len(first) - 1 and len(calls) == 2
    capped = copy.deepcopy(processor)
    cap_image_tiles(capped, 1)
    build(capped)
    assert len(calls) == 3  # the processor's grid changed
    for f in (tmp_path / "cache" / "scan").glob("*.npz"):
        f.write_bytes(b"not an npz")  # a corrupt entry is scanned again, never trusted
    assert len(build()) == len(first) - 1 and len(calls) == 4


@pytest.mark.parametrize("text, says", [
    ('{"id": 1, "task": "box"}\n{"id": 2, "task": "box"}\n', "one JSON object per line: that is JSON lines"),
    ('{"results": [{"id": 1}], "model": "x"}', "found a JSON object; its list(s) 'results' may hold the records"),
    ('{"images": [], "annotations": [], "categories": []}', "a COCO file: `lora-manip data normalize` converts it"),
    ('"just a string"', "expected a JSON array of records (or use .jsonl"),
])
def test_a_json_file_that_is_no_array_says_what_it_holds(tmp_path, text, says):
    """JSON lines under a .json name and an object holding the records are JSON: saying "invalid JSON" would send
    the user looking for a syntax error that is not there."""
    from lora_manip.eval.report import load_predictions

    (tmp_path / "a.json").write_text(text)
    ix = RecordIndex(tmp_path / "a.json")
    assert not ix.complete and says in ix.problems[0].reason
    with pytest.raises(UserError) as e:
        load_predictions(tmp_path / "a.json")
    assert says in str(e.value) and "invalid JSON" not in str(e.value) and "\n" not in str(e.value)
