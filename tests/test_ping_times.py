"""A worker's last pings for the supervisor's scrape (hbd.ping_times): fixed-size records, read
whole however the stream is cut."""

import math

from hbd.ping_times import PER_CHUNK, RECORD, Reader, chunks


def test_records_cut_anywhere_are_read_whole_and_a_time_that_is_not_finite_is_dropped() -> None:
    pairs = [(i * 7919, 1000.0 + i / 3) for i in range(60)]
    pairs[5] = (5, math.inf)
    pairs[9] = (9, -math.inf)
    pairs[11] = (11, math.nan)
    data = b"".join(chunks(pairs))
    assert len(data) == RECORD.size * len(pairs)  # 16 bytes a peer, whatever its name
    kept = [p for p in pairs if math.isfinite(p[1])]
    for cut in (1, 3, 15, 16, 17, 100, len(data)):
        reader, got = Reader(), []
        for start in range(0, len(data), cut):
            got += reader.feed(data[start : start + cut])
        assert got == kept and reader.rest == b"", cut


def test_the_records_come_per_chunk_records_a_chunk() -> None:
    out = list(chunks((i, float(i)) for i in range(2 * PER_CHUNK + 1)))
    assert [len(c) for c in out] == [PER_CHUNK * RECORD.size] * 2 + [RECORD.size]
    assert list(chunks([])) == []
