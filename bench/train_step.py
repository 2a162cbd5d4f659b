"""Distillation step time divided by the sum of its parts timed alone (overhead of llcm's loop).

parts: teacher cond+uncond forward (x calls per solver step), solver arithmetic, student forward +
backward, target forward; the full step also draws the batch, clips, steps AdamW and updates the EMA.
Ends with `ratio <value>` (target <= 1.25). Run: python bench/train_step.py [--solver leapfrog]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llcm.latents import LatentSet
from llcm.models import build_tiny_components, load_preset
from llcm.schedules import expand_like, prediction_to_x0_eps
from llcm.solvers import CALLS_PER_STEP, get_solver
from llcm.tasks import DistillTask
from llcm.training import batch_indices, step_generator


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--solver", default="leapfrog")
    args = ap.parse_args()
    torch.manual_seed(0)
    comps = build_tiny_components(load_preset("tiny-cpu"), seed=0)
    size = comps.unet.config.sample_size
    data = LatentSet(torch.randn(256, 4, size, size), torch.arange(256) % 8, [f"class {i}" for i in range(8)])
    task = DistillTask(comps, data, solver=args.solver)
    net, sched = task.trainable, task.schedule
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    b = args.batch
    batch = task.draw(batch_indices(len(data), b, 0, 0), step_generator(0, 0))

    def full_step():
        mb = task.draw(batch_indices(len(data), b, 1, 0), step_generator(0, 1))
        loss = task.loss(net, mb).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_step()

    z_t = sched.add_noise(batch["z0"], batch["noise"], batch["t"])
    both = torch.cat([batch["embeds"], batch["null_embeds"]])
    z2, t2 = torch.cat([z_t, z_t]), torch.cat([batch["t"], batch["t"]]).float()

    def teacher_fwd():
        with torch.no_grad():
            for _ in range(CALLS_PER_STEP[args.solver]):
                comps.unet(z2, t2, encoder_hidden_states=both)

    with torch.no_grad():
        out = comps.unet(z2, t2, encoder_hidden_states=both).sample
    a, s = (expand_like(v, z2) for v in sched.alpha_sigma(t2))
    cached = prediction_to_x0_eps(out, z2, a, s, "epsilon")

    def solver_only():  # the solver's arithmetic with the teacher's outputs precomputed
        with torch.no_grad():
            get_solver(args.solver)(lambda z, t: cached, z2, t2, torch.cat([batch["s"]] * 2).float(), sched)

    def student_fwd_bwd():
        out = net(z_t, batch["t"], batch["embeds"], batch["w"])
        out.float().pow(2).mean().backward()
        opt.zero_grad(set_to_none=True)

    def target_fwd():
        with torch.no_grad():
            task.target(z_t, batch["s"], batch["embeds"], batch["w"])

    parts = {"teacher": timed(teacher_fwd, args.repeats), "solver": timed(solver_only, args.repeats),
             "student": timed(student_fwd_bwd, args.repeats), "target": timed(target_fwd, args.repeats)}
    full = timed(full_step, args.repeats)
    print(f"tiny-cpu distillation step, solver {args.solver}, batch {b}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for k, v in parts.items():
        print(f"  {k:8s} {v * 1e3:8.1f} ms")
    print(f"  {'sum':8s} {sum(parts.values()) * 1e3:8.1f} ms")
    print(f"  {'step':8s} {full * 1e3:8.1f} ms")
    print(f"ratio {full / sum(parts.values()):.3f}")


if __name__ == "__main__":
    main()
