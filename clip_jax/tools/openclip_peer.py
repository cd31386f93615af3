"""open_clip's training step in a process of its own, stepped on request: the peer that
`python -m clip_jax.benchmark --what=vs_openclip` times against clip_jax's step.

The peer runs apart from the JAX process, as `../shared/bench/openclip_train_step.py` does, so
that neither library's thread pools nor allocator share a process with the other's. The two never
run at once: the benchmark asks for one step, waits for its time, runs its own, and so on, so
that drift and load hit both alike.

    python -m clip_jax.tools.openclip_peer MODEL BATCH IMAGE_SIZE LENGTH THREADS

The first line written is `{"parameters": N}` (or `{"error": "..."}` and exit 2); then each
line `step` read from stdin runs one step (forward of both towers, open_clip's ClipLoss,
backward, AdamW, as OpenCLIP trains) and answers `{"seconds": S}`. End of input ends it.
`Peer` is the other end: it starts this process and asks for steps.
"""

import json
import subprocess
import sys
import tempfile
import time

from clip_jax.infra.errors import UsageError


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def make_step(name: str, batch_size: int, image_size: int, length: int, threads: int):
    """`(step, parameters)`: one open_clip training step on a randomly initialised `name`."""
    import open_clip
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = open_clip.create_model(name, pretrained=None)
    model.train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    images = torch.randn(batch_size, 3, image_size, image_size)
    tokens = torch.randint(1, 49406, (batch_size, length))

    def step() -> float:
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


class Peer:
    """The benchmark's side: this module run as a child process, stepped on request."""

    def __init__(self, name: str, batch_size: int, image_size: int, length: int, threads: int):
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        args = [str(a) for a in (name, batch_size, image_size, length, threads)]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "clip_jax.tools.openclip_peer", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        first = self._read()
        if "error" in first:
            raise UsageError(f"--what=vs_openclip: open_clip {first['error']}")
        self.parameters = first["parameters"]

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:  # the peer died: its own traceback says why
            self._log.seek(0)
            raise RuntimeError(f"the open_clip peer process ended:\n{self._log.read()[-4000:]}")
        return json.loads(line)

    def step(self) -> float:
        """Runs one of the peer's steps; its seconds, as the peer timed them."""
        self._proc.stdin.write("step\n")
        self._proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()
        self._log.close()


def main(argv: list[str]) -> int:
    name, batch_size, image_size, length, threads = argv[0], *(int(a) for a in argv[1:5])
    try:
        step, parameters = make_step(name, batch_size, image_size, length, threads)
    except ImportError:
        _reply({"error": "needs torch and open_clip_torch: pip install -e '.[reference]'"})
        return 2
    except RuntimeError as e:  # open_clip's "Model config for X not found"
        _reply({"error": f"{name!r}: {e}"})
        return 2
    _reply({"parameters": parameters})
    for line in sys.stdin:
        if line.strip() != "step":
            continue
        start = time.perf_counter()
        step()
        _reply({"seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
