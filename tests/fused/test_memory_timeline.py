"""tools/memory_timeline.py's reading of an allocator snapshot (a made-up one: no GPU here)."""
from tool_scripts import load_tool

MiB = 1 << 20


def tool():
    return load_tool("memory_timeline")


def event(action, mib, stream=0, where="offload.py"):
    return {"action": action, "size": mib * MiB, "stream": stream, "addr": 0,
            "frames": [{"filename": f"/x/fastbench/{where}", "line": 7, "name": "save"}]}


SNAPSHOT = {
    "segments": [  # the state after the history: 100 MiB on stream 0 (40 allocated), 20 on stream 7 (none)
        {"device": 0, "stream": 0, "total_size": 100 * MiB, "allocated_size": 40 * MiB,
         "blocks": [{"size": 40 * MiB, "state": "active_allocated"}, {"size": 60 * MiB, "state": "inactive"}]},
        {"device": 0, "stream": 7, "total_size": 20 * MiB, "allocated_size": 0,
         "blocks": [{"size": 20 * MiB, "state": "inactive"}]}],
    "device_traces": [[event("segment_alloc", 20, stream=7), event("alloc", 30), event("alloc", 10),
                       event("free_requested", 30), event("segment_map", 60, where="decoder.py"), event("alloc", 40),
                       event("free_completed", 30), event("free_requested", 10), event("free_completed", 10)]],
}


def test_the_history_is_replayed_from_the_state_worked_back():
    moments = tool().timeline(SNAPSHOT)
    got = [(m["reserved"] // MiB, m["allocated"] // MiB, m["pending"] // MiB) for m in moments]
    assert got == [(60, 0, 0), (60, 30, 0), (60, 40, 0), (60, 10, 30), (120, 10, 30), (120, 50, 30), (120, 50, 0),
                   (120, 40, 10), (120, 40, 0)]


def test_the_summary_names_the_widest_gaps_one_per_growth_of_reserved():
    m = tool()
    assert [g["index"] for g in m.widest_gaps(m.timeline(SNAPSHOT), 5)] == [4, 0]
    text = m.summary(SNAPSHOT, top=5, settings="expandable_segments:True")
    assert text.startswith("allocator settings: expandable_segments:True")
    assert "stream 0: 0.10 GiB (0.04 allocated), stream 7: 0.02 GiB (0.00 allocated)" in text
    assert "event 4: reserved 0.12 GiB, allocated 0.01, gap 110 MiB (pending frees 30 MiB); segment_map of 60.0 MiB" \
           in text and "decoder.py:7 save" in text


def test_what_is_live_at_the_most_allocated_moment_grouped_by_where():
    m = tool()

    def alloc(mib, addr, where):
        return {**event("alloc", mib, where=where), "addr": addr}

    def free(mib, addr):
        return {**event("free_requested", mib), "addr": addr}

    snapshot = {"segments": [{"device": 0, "stream": 0, "total_size": 200 * MiB, "allocated_size": 35 * MiB,
                              "blocks": [{"size": 35 * MiB, "state": "active_allocated"}]}],
                # 20 MiB allocated before the history, 5 of it freed in it; the peak: 15 + 30 + 20 + 10 allocated
                "device_traces": [[free(5, 99), alloc(30, 1, "lora.py"), alloc(20, 2, "lora.py"),
                                   alloc(10, 3, "rope.py"), free(30, 1), free(20, 2), alloc(10, 4, "rope.py")]]}
    peak, before, groups = m.live_at_peak(m.timeline(snapshot))
    assert peak["index"] == 3 and peak["allocated"] == 75 * MiB and before == 15 * MiB
    assert [(where.split()[0], size // MiB, blocks) for where, size, blocks in groups] == [
        ("lora.py:7", 50, 2), ("rope.py:7", 10, 1)]
    text = m.summary(snapshot, top=1)
    assert "at the most allocated moment (event 3, 0.07 GiB): 0.01 GiB allocated before the step" in text
    assert "- 50.0 MiB in 2 blocks: lora.py:7 save" in text and "rope.py" not in text.split("moments of the most")[0]
