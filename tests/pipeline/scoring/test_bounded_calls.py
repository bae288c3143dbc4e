"""What crosses to the scoring actors is bounded: a document's images the model can never see stay with the reader
(and the scores do not change), and a call is bounded in bytes as well as rows."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import model
from jobs import sample_corpus as corpus
from pipeline.io.listing import list_shards
from pipeline.io.samples import SourceOptions
from pipeline.runner.stage import Resources, shard_rows
from pipeline.scoring.reading import ReadStage
from pipeline.scoring.scorer import BatchScorer
from tests.support import hostile


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return model.load(tiny_checkpoint)


def read(root, images_seen=None) -> pa.Table:
    """A shard's samples as the read stage hands them on (its end marker left out)."""
    shard = list_shards(str(root), "interleaved-wds").shards[0]
    reader = ReadStage(Resources(), "interleaved-wds", SourceOptions(), images_seen=images_seen)
    table = pa.concat_tables(reader(pa.Table.from_pylist(shard_rows([[shard]]))))
    return table.filter(pc.invert(pc.starts_with(table.column("kind"), "_")))


def test_a_documents_unseen_images_stay_with_the_reader_and_its_score_does_not_change(tmp_path, loaded):
    net, processor = loaded
    image = corpus.draw(corpus.random_scene(random.Random(1)), size=96)
    docs = [{"key": f"d{k}", **dict(zip(("texts", "images"), hostile.many_image_document(40 + 20 * k, image=image)))}
            for k in range(3)]
    corpus.write_interleaved_wds(str(tmp_path / "0.tar"), docs)
    whole, shipped = read(tmp_path), read(tmp_path, images_seen=processor.images_seen)
    assert shipped.nbytes * 3 < whole.nbytes
    assert [sum(1 for i in r if i) for r in shipped.column("images").to_pylist()] == [16, 16, 16]
    scorer = BatchScorer(net, processor, token_budget=8192, max_batch=8)
    columns = ["id", "score", "n_images", "n_tokens", "truncated", "error"]
    assert (scorer.score_table(shipped).select(columns).to_pylist()
            == scorer.score_table(whole).select(columns).to_pylist())
