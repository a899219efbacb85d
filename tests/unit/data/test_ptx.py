"""PTX batches: blocks of plain text, an endless seeded stream that a resumed run can skip into."""

from itertools import islice

from chatrl.data.ptx import ptx_batches


def test_skip_continues_the_same_stream(tiny_tokenizer, tmp_path):
    f = tmp_path / "ptx.txt"
    f.write_text("\n".join(f"document number {i} has a few words in it" for i in range(7)) + "\n")
    full = [b["input_ids"].tolist() for b in islice(ptx_batches(str(f), None, tiny_tokenizer, 8, 3, 0), 12)]
    # several blocks per document, and the stream runs past one epoch (a fresh shuffle after it)
    for skip in (0, 1, 4, 9):
        again = [b["input_ids"].tolist()
                 for b in islice(ptx_batches(str(f), None, tiny_tokenizer, 8, 3, 0, skip=skip), 12 - skip)]
        assert again == full[skip:]
