"""In-process daemon, N frames: per-frame server timings and GC pauses (gc.callbacks, wall) by where they land."""
import gc, sys, time, json, os, numpy as np
from stm_feedback.config import Settings, ServerSettings
from stm_feedback.server import Server, load_analyzer
from stm_feedback.client import Client
from stm_feedback.benchmark import simulated_frames
every = int(sys.argv[1]); n = int(sys.argv[2])
pauses = []  # (gen, wall ms, in_analysis)
state = {"t0": 0.0, "in": False}
def cb(phase, info):
    if phase == "start": state["t0"] = time.perf_counter()
    else: pauses.append((info["generation"], (time.perf_counter() - state["t0"]) * 1e3, state["in"]))
gc.callbacks.append(cb)
settings = Settings()
an = load_analyzer(settings)
orig = an.analyze
def wrapped(*a, **k):
    state["in"] = True
    try: return orig(*a, **k)
    finally: state["in"] = False
an.analyze = wrapped
srv = Server(an, ServerSettings(warmup_px=128, gc_every_frames=every), bind="tcp://127.0.0.1:*").start()
frames = list(simulated_frames(30, 256, 2_000_000, preset="realistic"))
c = Client(srv.endpoint, timeout_ms=60000, retries=0)
tot, ana, st, rt = [], [], [], []
for i in range(n + 5):
    f = frames[i % len(frames)]
    if i == 5: pauses.clear()
    t = time.perf_counter()
    c.analyze(f.image_nm, f.pixel_size_nm, bias_v=f.bias_v, with_maps=False)
    w = (time.perf_counter() - t) * 1e3
    tm = c.last_reply["timings_ms"]
    if i >= 5: tot.append(tm["total"]); ana.append(tm["analyze"]); st.append(tm["state"]); rt.append(w)
    time.sleep(0.02)  # an instrument frame takes seconds; leave the daemon idle a little
c.close(); srv.stop()
p = np.array([x[1] for x in pauses]) if pauses else np.zeros(1)
inside = np.array([x[1] for x in pauses if x[2]] or [0.0])
q = lambda a: "p50 %.1f p95 %.1f p99 %.1f max %.1f" % tuple(np.percentile(a, [50, 95, 99, 100]))
print(json.dumps(dict(every=every, load=os.getloadavg()[0])))
print(" round trip", q(rt)); print(" server total", q(tot)); print(" analyze", q(ana)); print(" state", q(st))
print(" gc collections %d (gen2 %d), in analysis %d; sum of pauses in analysis %.1f ms, max %.1f; all pauses max %.1f, sum %.1f" % (
    len(pauses), sum(x[0] == 2 for x in pauses), sum(x[2] for x in pauses), inside.sum(), inside.max(), p.max(), p.sum()))
print(" gen2 pauses ms:", sorted(round(x[1], 1) for x in pauses if x[0] == 2)[-8:])
