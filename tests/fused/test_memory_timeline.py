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
