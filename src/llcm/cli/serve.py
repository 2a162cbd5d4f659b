"""`llcm serve`: the web page and HTTP API (optional extra: pip install 'llcm[ui]')."""

from __future__ import annotations

import argparse
import importlib.util

from llcm.cli.options import add_model_options
from llcm.errors import UserError
from llcm.presets import MAX_BATCH, MAX_SIZE, MAX_STEPS

HELP = """\
Serve a web page and an HTTP API that generate images with a latent consistency model: prompt, steps,
seed, guidance, number of images, a gallery, a zip of the PNGs with their metadata, and the same seed
at 1, 2, 4 and 8 steps side by side. Needs the ui extra: pip install 'llcm[ui]'.

Safety: binds to 127.0.0.1 (this machine only) unless --host says otherwise, and warns loudly when it
does; hard limits on steps, images per request, image size and queued requests (a request beyond the
queue gets a "busy" answer, HTTP 503); the page cannot name files, and images are written only under
--out.

examples:
  llcm serve                                   default model on http://127.0.0.1:7860/
  llcm serve --model runs/llcm/model --port 8000 --out out/serve
  llcm serve --adapter runs/lcf-dog/model      an LCF adapter merged into the base it records
  curl -s http://127.0.0.1:7860/api/generate -H 'Content-Type: application/json' \\
       -d '{"prompt": "axial brain MRI, T1-weighted", "steps": 4, "seed": 0, "n": 2}'
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="web page + HTTP API for generation (pip install 'llcm[ui]')",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; anything else is exposed)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--out", default="out/serve", help="the only folder images are written to (default out/serve)")
    p.add_argument("--max-steps", type=int, default=8,
                   help=f"most steps a request may ask for (default 8, at most {MAX_STEPS}; the model's own limit, one per "
                        "point of its skipping grid, applies too)")
    p.add_argument("--max-images", type=int, default=4, help=f"most images per request (default 4, at most {MAX_BATCH})")
    p.add_argument("--max-size", type=int, default=1024, help="largest height/width in pixels (default 1024)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests running or waiting at once; more get a busy answer (default 8, at most 64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise UserError("llcm serve needs the ui extra: pip install 'llcm[ui]'")
    from llcm.serve import Limits, serve

    for name, v, hi in (("--max-steps", args.max_steps, MAX_STEPS), ("--max-images", args.max_images, MAX_BATCH),
                        ("--max-size", args.max_size, MAX_SIZE), ("--queue", args.queue, 64)):
        if not 1 <= v <= hi:
            raise UserError(f"{name} must be between 1 and {hi}, got {v}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    serve(args.model, args.host, args.port, args.out,
          Limits(args.max_steps, args.max_images, args.max_size, args.queue), adapter=args.adapter)
    return 0
