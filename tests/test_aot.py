"""`python -m clip_jax.aot` compiles the tiny config's real train step for a 4-chip v5e slice on
this CPU (libtpu's compile-only devices) and reports memory, a verdict, FLOPs and collectives;
its mistakes are one line. The tests that compile skip where libtpu is absent (`.[aot]`)."""

import importlib.util
import json
import textwrap

import jax
import pytest

from clip_jax.tools import hlo
from tests.conftest import run_python

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[aot]'"
)
V5E_HBM = 16 * 2**30


def run_aot(*args: str):
    return run_python(["-m", "clip_jax.aot", "--config=configs/tiny.py", *args], timeout=600)


def run_fsdp_aot(*args: str):
    """The tiny config on v5e:2x2 with its 4 chips all on 'fsdp'."""
    fsdp = (
        "--topology=v5e:2x2",
        "--search_batch=0",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
    )
    return run_aot(*fsdp, *args)


def last_json(done) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_libtpu
def test_the_tiny_step_fits_a_v5e_slice_and_the_search_doubles_the_batch():
    done = run_aot("--topology=v5e:2x2", "--search_batch=1")
    r = last_json(done)
    assert r["topology"] == "v5e:2x2" and r["device_kind"] == "TPU v5 lite" and r["chips"] == 4
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["batch_size"] == 32
    assert r["fits"] is True and r["hbm_bytes"] == V5E_HBM and not r["compile_error"]
    # The donated state's outputs reuse its arguments' buffers: counted once.
    parts = ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes")
    assert r["per_chip_bytes"] == sum(r[k] for k in parts) - r["alias_bytes"] > 0
    assert 0 < r["alias_bytes"] <= min(r["argument_bytes"], r["output_bytes"])
    assert r["flops_per_step"] > 0 and r["model_flops_per_step"] > 0 and r["compile_s"] > 0
    chips_peak = r["chips"] * r["peak_flops_per_chip"] * r["mfu"]
    assert r["est_step_s"] == pytest.approx(r["model_flops_per_step"] / chips_peak)
    # Data parallelism: the gradients are summed over the 4 chips in float32.
    assert r["collectives"]["all-reduce"]["count"] >= 1
    assert "f32" in r["collectives"]["all-reduce"]["dtypes"]
    assert r["largest_collectives"][0]["bytes"] > 0
    assert [t["batch_size"] for t in r["search"]] == [32, 64] and r["max_batch_size"] == 64
    assert r["replicated_params"] == [] and r["replicated_count"] == r["replicated_bytes"] == 0
    assert "fits" in done.stdout and "collectives per step" in done.stdout


@needs_libtpu
def test_fsdp_names_the_parameters_it_leaves_replicated(tmp_path):
    r = last_json(
        run_fsdp_aot(
            "--config.model.vision.width=34",  # which 4 chips do not divide
            f"--hlo_out={tmp_path / 'step.hlo'}",
        )
    )
    assert (tmp_path / "step.hlo").read_text().startswith("HloModule jit_train_step")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["fits"] is True
    # The image tower's kernels fall back to replication (their other axis is the 1-device
    # 'tensor'); the text tower's are split. Listed: matrices; counted: the vectors too.
    paths = {p["path"] for p in r["replicated_params"]}
    assert "visual/conv1/kernel" in paths
    assert any(p.startswith("visual/transformer") and p.endswith("kernel") for p in paths)
    assert not any(p.startswith("text_tower/") and p.endswith("kernel") for p in paths)
    assert all(len(p["shape"]) >= 2 for p in r["replicated_params"])
    assert r["replicated_count"] > len(paths)  # norms, biases, the temperature
    assert r["replicated_bytes"] > sum(p["bytes"] for p in r["replicated_params"])
    assert r["search"] == [r["search"][0]] and r["max_batch_size"] is None


@needs_libtpu
def test_a_batch_beyond_hbm_is_a_verdict_not_a_traceback():
    done = run_aot("--topology=v5e:2x2", "--search_batch=1", "--config.batch_size=262144")
    r = last_json(done)
    assert r["fits"] is False and r["per_chip_bytes"] > r["hbm_bytes"] and r["compile_error"]
    assert r["flops_per_step"] is None and r["collectives"] == {}
    assert [t["batch_size"] for t in r["search"]] == [262144, 131072]  # halved, still too big
    assert r["max_batch_size"] is None and r["min_batch_not_fitting"] == 131072
    assert "does NOT fit" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v9x:2x2"], "--topology=v9x:2x2: use GEN:CHIPS with GEN one of v4, v5e"),
        (["--topology=v5e:2x2", "--mfu=2"], "--mfu=2.0: use a fraction in (0, 1]"),
        pytest.param(
            ["--topology=v5e:2x2", "--config.batch_size=30"],
            "batch_size 30 does not divide over the 4 batch shards",
            marks=needs_libtpu,
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args, message):
    done = run_aot(*args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in done.stderr


@needs_libtpu
def test_a_shape_libtpu_refuses_is_one_line():
    done = run_aot("--topology=v5e:3x3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --topology=v5e:3x3: ")


def test_without_libtpu_the_error_says_what_to_install():
    script = textwrap.dedent(
        """
        import importlib.util, runpy, sys
        find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "libtpu" else find(name, *a)
        sys.argv = ["aot", "--config=configs/tiny.py", "--topology=v5e:2x2"]
        runpy.run_module("clip_jax.aot", run_name="__main__")
        """
    )
    done = run_python(["-c", script])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: compiling for a TPU topology needs libtpu: pip install 'clip-jax-train[aot]'"
    )


# A compiled module's text, cut down: a loop body (a scanned layer) that all-gathers a bf16
# weight asynchronously and reduce-scatters its f32 gradient through an async wrapper, run by
# two loops: 12 times (the bound its condition compares with, as TPU programs say it) and twice
# (XLA's known trip count); then a combined all-gather, an all-gather spread over two fusions (a
# TPU async collective fusion: one collective, its copies sharing channel and chain ids), a
# combined all-reduce and a collective permute outside them.
HLO = """
HloModule jit_train_step, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%scatter (g: f32[64,128]) -> f32[16,128] {
  %g = f32[64,128]{1,0:T(8,128)} parameter(0)
  ROOT %rs = f32[16,128]{1,0:T(8,128)} reduce-scatter(%g), replica_groups=[1,4]<=[4], to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(CLIP.encode_image))/visual/dot_general" stack_frame_id=7}
}

%body (p: (s32[], bf16[16,128])) -> (s32[], bf16[16,128]) {
  %p = (s32[], bf16[16,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[16,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %ags = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%w), dimensions={0}
  %agd = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather-done(%ags)
  %f = f32[64,128]{1,0} convert(%agd)
  %rss = ((f32[64,128]{1,0}), f32[16,128]{1,0}) async-start(%f), calls=%scatter
  %rsd = f32[16,128]{1,0} async-done(%rss)
  ROOT %t = (s32[], bf16[16,128]{1,0}) tuple(%i, %w)
}

%gather_start (s: bf16[2,4]) -> bf16[8,4] {
  %s = bf16[2,4]{1,0} parameter(0)
  ROOT %g1 = bf16[8,4]{1,0} all-gather(%s), channel_id=9, dimensions={0}, frontend_attributes={chain_id="0"}
}

%gather_step (t: bf16[2,4]) -> bf16[8,4] {
  %t = bf16[2,4]{1,0} parameter(0)
  ROOT %g2 = bf16[8,4]{1,0} all-gather(%t), channel_id=9, dimensions={0}, frontend_attributes={chain_id="0"}
}

%cond (c: (s32[], bf16[16,128])) -> pred[] {
  %bound = s32[]{:T(128)} constant(12)
  %c = (s32[], bf16[16,128]{1,0}) parameter(0)
  %counter = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%counter, %bound), direction=LT
}

ENTRY %main (a: f32[8], b: f32[4,4], w0: bf16[16,128], u: bf16[2,4], v: bf16[2,4]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %w0 = bf16[16,128]{1,0} parameter(2)
  %u = bf16[2,4]{1,0} parameter(3)
  %v = bf16[2,4]{1,0} parameter(4)
  %ag = (bf16[8,4]{1,0}, bf16[8,4]{1,0}) all-gather(%u, %v), dimensions={0}
  %acs = bf16[8,4]{1,0} fusion(%u), kind=kCustom, calls=%gather_start
  %acd = bf16[8,4]{1,0} fusion(%acs), kind=kCustom, calls=%gather_step
  %ar = (f32[8]{0}, f32[4,4]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3}}, to_apply=%add
  %zero = s32[] constant(0)
  %init = (s32[], bf16[16,128]{1,0}) tuple(%zero, %w0)
  %loop = (s32[], bf16[16,128]{1,0}) while(%init), condition=%cond, body=%body
  %again = (s32[], bf16[16,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"2"}}
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1}}
  ROOT %cpd = f32[8]{0} collective-permute-done(%cps)
}
"""  # noqa: E501 (lines as XLA prints them)


def test_collectives_are_counted_per_step_with_their_buffers():
    found = hlo.collectives(HLO)
    assert found["collectives"] == {
        "all-reduce": {"count": 1, "bytes": 4 * (8 + 16), "dtypes": ["f32"]},
        # 12 + 2 iterations: the gathered bf16 weight, the f32 gradient before it is scattered;
        # outside: the combined all-gather's two results and the fused one's, once
        "all-gather": {"count": 16, "bytes": 14 * 64 * 128 * 2 + 3 * 8 * 4 * 2, "dtypes": ["bf16"]},
        "reduce-scatter": {"count": 14, "bytes": 14 * 64 * 128 * 4, "dtypes": ["f32"]},
        "collective-permute": {"count": 1, "bytes": 4 * 8, "dtypes": ["f32"]},
    }
    largest = found["largest_collectives"][0]
    assert largest == {
        "kind": "reduce-scatter",
        "shape": "f32[64,128]",
        "bytes": 32768,
        "times": 14,
        "op": "jit(train_step)/transpose(jvp(CLIP.encode_image))/visual/dot_general",
    }


FUSED_SCATTER_HLO = """\
HloModule fused_scatter

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter (input: f32[64,128]) -> f32[16,128] {
  %input = f32[64,128]{1,0:T(8,128)S(1)} parameter(0)
  %all-reduce.7 = f32[64,128]{1,0:T(8,128)} all-reduce(%input), channel_id=5, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %partition-id.7 = u32[] partition-id()
  %constant.8 = u32[] constant(16)
  %multiply.9 = u32[]{:T(128)} multiply(%partition-id.7, %constant.8)
  %constant.9 = u32[] constant(0)
  ROOT %dynamic-slice.3 = f32[16,128]{1,0:T(8,128)S(1)} dynamic-slice(%all-reduce.7, %multiply.9, %constant.9), dynamic_slice_sizes={16,128}
}

ENTRY %main (g: f32[64,128], a: f32[8]) -> (f32[16,128], f32[8]) {
  %g = f32[64,128]{1,0:T(8,128)} parameter(0)
  %a = f32[8]{0} parameter(1)
  %fusion = f32[16,128]{1,0:T(8,128)S(1)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter, backend_config={"flag_configs":[],"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion","strategy":"StrategyRing"}}
  %ar = f32[8]{0} all-reduce(%a), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %out = (f32[16,128]{1,0}, f32[8]{0}) tuple(%fusion, %ar)
}
"""  # noqa: E501 (lines as libtpu prints them)


def test_an_all_reduce_that_libtpu_runs_as_a_reduce_scatter_counts_as_one():
    # libtpu writes some reduce-scatters as an all-reduce and a slice in a fusion that its
    # reduce-scatter emitter runs: one reduce-scatter of the whole input, not an all-reduce.
    assert hlo.collectives(FUSED_SCATTER_HLO)["collectives"] == {
        "reduce-scatter": {"count": 1, "bytes": 64 * 128 * 4, "dtypes": ["f32"]},
        "all-reduce": {"count": 1, "bytes": 8 * 4, "dtypes": ["f32"]},
    }


@needs_libtpu
def test_products_keep_their_shapes_in_a_tpu_program_compiled_on_a_cpu():
    # The CPU's matrix form (models/fsdp.py) would make a TPU re-tile activations to merge them.
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from clip_jax.parallel import fsdp
        from clip_jax.tools import pod_fit
        _, devices = pod_fit.topology_devices("v5e:2x2")
        assert fsdp._on_cpu() and fsdp._as_matrices(None, 1, 4)
        with jax.set_mesh(jax.sharding.Mesh(np.array(devices), ("data",))):
            assert not fsdp._on_cpu() and not fsdp._as_matrices(None, 1, 4)
        print("ok")
        """
    )
    done = run_python(["-c", code])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@needs_libtpu
def test_fsdp_compiles_to_gathers_and_reduce_scatters_in_a_tpu_program(tmp_path):
    # Width 256 over 4 chips: 64-row shards, which the TPU compiler keeps as asked (3-row
    # shards, B/16's 768 over 256 chips, it writes as all-reduces: docs/performance.md).
    program = tmp_path / "step.hlo"
    r = last_json(
        run_fsdp_aot(
            "--config.model.dtype=bfloat16",
            "--config.model.vision.width=256",
            "--config.model.text.width=256",
            f"--hlo_out={program}",
        )
    )
    assert r["collectives"]["all-gather"]["dtypes"] == ["bf16"]
    assert r["collectives"]["reduce-scatter"]["dtypes"] == ["f32"]
    found: dict[str, set] = {"all-gather": set(), "reduce-scatter": set(), "all-reduce": set()}
    for ins in hlo.instructions(program.read_text()):
        kind = ins.opcode.removesuffix("-start")
        if kind in found:
            found[kind] |= set(hlo.arrays(ins.shape))
    # Every transformer kernel (attention in and out, MLP in and out, both towers): gathered
    # whole in bfloat16, its gradient reduce-scattered to a float32 shard, never all-reduced.
    # So is the token table, whose gradient (a scatter's output, split along its width) the
    # compiler would otherwise all-reduce whole (models/fsdp.py, `_reduce_scatter`).
    kernels = {(256, 3, 2, 128): 0, (2, 128, 256): 2, (256, 1024): 0, (1024, 256): 1}
    for full, dim in {**kernels, (49408, 256): 1}.items():
        shard = tuple(n // 4 if i == dim else n for i, n in enumerate(full))
        assert ("bf16", full) in found["all-gather"], full
        assert ("f32", shard) in found["reduce-scatter"], shard
        assert not {("f32", full), ("bf16", full)} & found["all-reduce"], full


def test_a_program_libtpu_cannot_print_costs_the_collectives_not_the_report():
    class Unprintable:
        def as_text(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure (hlo_instruction.cc)")

    assert hlo.program_text(None) == ("", "")
    text, error = hlo.program_text(Unprintable())
    assert text == "" and error.startswith("INTERNAL: RET_CHECK failure")
    assert hlo.collectives(text) == {"collectives": {}, "largest_collectives": []}
