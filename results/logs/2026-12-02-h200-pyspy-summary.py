# summary of a py-spy raw file (--threads): the main thread's samples within timed_steps plus every other
# thread's (autograd's backward threads); self time by function frame, inclusive by frame
import collections, sys
import re
lines = [(m.group(1), None, m.group(2)) for m in (re.match(r"^(.*) (\d+)$", l.rstrip()) for l in open(sys.argv[1])) if m]
main = {s.split(";")[0] for s, _, _ in lines if "<module> (" in s}
selfc, incl, total = collections.Counter(), collections.Counter(), 0
for stack, _, n in lines:
    frames = stack.split(";")
    if frames[0] in main and not any(f.startswith("timed_steps ") for f in frames):
        continue
    n = int(n); total += n
    selfc[frames[-1]] += n
    for f in set(frames[1:]):
        incl[f] += n
print(f"samples: {total}; main thread {main}")
print("self:"); [print(f"  {100*v/total:5.1f}%  {k[:150]}") for k, v in selfc.most_common(50)]
print("inclusive:"); [print(f"  {100*v/total:5.1f}%  {k[:150]}") for k, v in incl.most_common(100)]
