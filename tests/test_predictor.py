"""predict.py through cog's real HTTP server, on a tiny pipeline saved offline."""

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from cog_server import ROOT, CogServer, running
from PIL import Image

import fasterdiff
from fasterdiff.service import KEY_STEP_MODES, BOUNDS

FAST = dict(num_inference_steps=4, width=256, height=256)


def _png_uri(size, mode="RGB", white_right_half=False) -> str:
    """A picture as the data URI cog takes for a file input."""
    w, h = size
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    if white_right_half:
        image = Image.fromarray(np.where(np.arange(w)[None, :] >= w // 2, 255, 0).astype(np.uint8).repeat(h, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def images_of(body) -> list[Image.Image]:
    out = []
    for uri in body["output"]:
        header, data = uri.split(",", 1)
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        out.append((header, img))
    return out


@pytest.mark.parametrize(
    "inputs, n, fmt, size",
    [
        (dict(prompt="a cat", seed=1), 1, "WEBP", (256, 256)),
        (dict(prompt="a cat", seed=2, num_outputs=2, width=320, output_format="png"), 2, "PNG", (320, 256)),
        (dict(prompt="a dog", seed=3, height=264, output_format="jpg", key_step_mode="uniform",
              uniform_interval=2, sampler="Euler"), 1, "JPEG", (256, 264)),
        (dict(prompt="a dog", seed=3, key_step_mode="custom", custom_key_steps="0,2", parallel=False,
              compare_with_baseline=True), 2, "WEBP", (256, 256)),
    ],
)
def test_prediction_returns_images_matching_the_inputs(server, inputs, n, fmt, size):
    status, body = server.predict({**FAST, **inputs})
    assert status == 200 and body["status"] == "succeeded", body
    imgs = images_of(body)
    assert len(imgs) == n
    for header, img in imgs:
        assert img.format == fmt and img.size == size
        assert header.startswith("data:image/")
    logs = body["logs"]
    assert f"seed: {inputs['seed']}" in logs and "key steps:" in logs and "evaluations reusing cached features:" in logs
    if inputs.get("compare_with_baseline"):
        assert "speedup:" in logs and "stock diffusers seconds:" in logs


def test_same_seed_same_file_and_random_seed_is_logged(server):
    _, a = server.predict({**FAST, "prompt": "a cat", "seed": 7, "output_format": "png"})
    _, b = server.predict({**FAST, "prompt": "a cat", "seed": 7, "output_format": "png"})
    assert a["output"] == b["output"]
    _, c = server.predict({**FAST, "prompt": "a cat"})
    assert c["status"] == "succeeded" and "seed: " in c["logs"], c


def test_openapi_lists_every_input_with_type_default_and_bounds(server):
    schema = server.get("/openapi.json")["components"]["schemas"]
    props = schema["Input"]["properties"]
    expected = [
        "prompt", "negative_prompt", "image", "mask", "prompt_strength", "width", "height", "num_outputs", "sampler", "num_inference_steps",
        "key_step_mode", "uniform_interval", "custom_key_steps", "forecast", "parallel", "noise_injection_strength",
        "guidance_scale", "seed", "output_format", "output_quality", "disable_safety_checker",
        "compare_with_baseline",
    ]
    assert sorted(props, key=lambda k: props[k]["x-order"]) == expected
    assert schema["Input"]["required"] == ["prompt"]
    for name in expected:
        assert props[name].get("description"), name
        if name in ("width", "height"):  # SD 1.5: at least half its native 512 (Generator.min_size), not BOUNDS' 32
            assert (props[name]["minimum"], props[name]["maximum"]) == (512 // 2, BOUNDS[name][1]), name
        elif name in BOUNDS:
            assert (props[name]["minimum"], props[name]["maximum"]) == BOUNDS[name], name
    assert props["width"]["type"] == "integer" and props["width"]["default"] == 512
    assert props["noise_injection_strength"]["type"] == "number" and props["noise_injection_strength"]["default"] == 0.003
    assert props["parallel"]["type"] == "boolean" and props["parallel"]["default"] is True
    assert props["seed"]["nullable"] is True
    for name in ("image", "mask"):  # files: a URL or data URI, optional
        assert props[name]["format"] == "uri" and props[name]["nullable"] is True and props[name]["default"] is None
    assert props["prompt_strength"]["default"] == 0.8
    assert schema["sampler"]["enum"] == list(fasterdiff.SAMPLER_NAMES)
    assert schema["key_step_mode"]["enum"] == list(KEY_STEP_MODES)
    assert props["forecast"]["type"] == "integer" and props["forecast"]["default"] == 0
    assert schema["output_format"]["enum"] == ["webp", "jpg", "png"]
    assert props["key_step_mode"]["default"] == "auto"


def test_checked_in_schema_is_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cog_openapi_schema", ROOT / "scripts" / "cog_openapi_schema.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.TARGET.read_text() == generator.render(), "stale: run python scripts/cog_openapi_schema.py"


@pytest.mark.parametrize("folder", ["absent", "readme-only"])
def test_missing_weights_offline_fail_setup_with_the_download_command(tmp_path, folder):
    weights = tmp_path / "weights"
    if folder == "readme-only":  # as a fresh clone's weights/: huggingface_hub offline returns it as it is
        weights.mkdir()
        (weights / "README.md").write_text("how the weights get here\n")
    srv = CogServer(weights, extra_env={"HF_HOME": str(tmp_path / "hf")})
    try:
        health = srv.wait_setup()
        status, body = srv.predict({"prompt": "a cat"})
    finally:
        srv.stop()
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    # the same message as `python -m fasterdiff download-weights` gives
    assert f"no complete Stable Diffusion 1.5 weights in {weights} (missing: model_index.json)" in logs, logs
    assert f"python -m fasterdiff download-weights --dest {weights}" in logs, logs
    # cog answers predictions with its own text; README's Limits table says so
    assert "Setup has not finished yet" in json.dumps(body), (status, body)
    limits = (ROOT / "README.md").read_text().split("## Limits and errors", 1)[1]
    assert "Setup has not finished yet" in limits and "SETUP_FAILED" in limits


def test_setup_warms_up_and_says_how_long_it_took(server):
    # setup's last line can reach cog's log capture after it reports READY: ask again for a few seconds
    import time

    logs = server.health["setup"]["logs"]
    deadline = time.monotonic() + 10
    while not re.search(r"warm-up: \d+\.\d s \(compile: False\)", logs) and time.monotonic() < deadline:
        time.sleep(0.5)
        logs = server.get("/health-check")["setup"]["logs"]
    assert re.search(r"warm-up: \d+\.\d s \(compile: False\)", logs), logs


def _setup_health(weights, env: dict) -> dict:
    """The health check after a server's setup with ``env`` (the server stopped)."""
    srv = CogServer(weights, extra_env=env)
    try:
        return srv.wait_setup()
    finally:
        srv.stop()


def test_a_bad_setting_in_the_environment_fails_setup_naming_it(weights):
    health = _setup_health(weights, {"FASTERDIFF_COMPILE": "fast"})
    assert health["status"] == "SETUP_FAILED"
    assert "FASTERDIFF_COMPILE must be 1/true/yes/on, 0/false/no/off or a torch.compile mode" in health["setup"]["logs"]
    assert "got 'fast'" in health["setup"]["logs"]


def test_cli_generates_a_file(weights, tmp_path):
    out = tmp_path / "cat.png"
    result = subprocess.run(
        [sys.executable, "-m", "fasterdiff", "generate", "a cat", "--weights", str(weights), "--steps", "3",
         "--width", "256", "--height", "256", "--seed", "5", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "seed: 5" in result.stdout and "key steps:" in result.stdout
    assert "torchvision" not in result.stderr, result.stderr  # no import-time notice from transformers
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (256, 256)


def test_cli_names_files_by_image_and_the_baseline_s_as_stock(weights, tmp_path, capsys):
    from fasterdiff.__main__ import main

    args = ["generate", "a cat", "--weights", str(weights), "--steps", "3", "--width", "256", "--height", "256",
            "--seed", "5", "--num-outputs", "2", "--compare-with-baseline", "-o", str(tmp_path / "cat.png")]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png", "cat-1.png", "cat-stock-0.png", "cat-stock-1.png"]
    assert f"wrote {tmp_path / 'cat-stock-1.png'}" in capsys.readouterr().out


def test_cli_help_and_bad_argument(capsys):
    from fasterdiff.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--steps", "--key-step-mode", "--custom-key-steps", "--sampler", "--seed", "--sequential"):
        assert flag in help_text
    with pytest.raises(SystemExit) as done:
        main(["generate", "a cat", "--width", "5000"])
    assert done.value.code == 2 and "--width" in capsys.readouterr().err


LONG = "a cat " * 2000
SERVER_BAD_INPUTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   \n\t"), "prompt"),
    (dict(prompt=123), "prompt"),
    (dict(prompt=LONG * 2), "prompt"),
    (dict(negative_prompt=LONG * 2), "negative_prompt"),
    (dict(width="abc"), "width"),
    (dict(width=500), "width"),
    (dict(width=2048), "width"),
    (dict(height=100), "height"),
    (dict(height=260), "height"),
    (dict(width=256.5), "width"),
    (dict(num_outputs=0), "num_outputs"),
    (dict(num_outputs=5), "num_outputs"),
    (dict(sampler="LMS"), "sampler"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=101), "num_inference_steps"),
    (dict(num_inference_steps="many"), "num_inference_steps"),
    (dict(key_step_mode="fast"), "key_step_mode"),
    (dict(uniform_interval=1), "uniform_interval"),
    (dict(uniform_interval=11), "uniform_interval"),
    (dict(key_step_mode="custom", custom_key_steps="0,,3"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="-1"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="3,2"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="a"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="0,2,2"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="0,2,4"), "custom_key_steps"),  # 4 >= num_inference_steps
    (dict(key_step_mode="custom", custom_key_steps="1,2"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps=""), "custom_key_steps"),
    (dict(key_step_mode="uniform", custom_key_steps="0,1"), "custom_key_steps"),
    (dict(noise_injection_strength=1.5), "noise_injection_strength"),
    (dict(noise_injection_strength=0.05), "noise_injection_strength"),
    (dict(width=248), "width"),  # below SD 1.5's smallest, 256: refused by the schema
    (dict(key_step_mode="auto", forecast=1), "forecast"),
    (dict(noise_injection_strength=-0.01), "noise_injection_strength"),
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(guidance_scale=25), "guidance_scale"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(seed="lucky"), "seed"),
    (dict(output_format="gif"), "output_format"),
    (dict(output_quality=0), "output_quality"),
    (dict(output_quality=101), "output_quality"),
    (dict(parallel="maybe"), "parallel"),
    (dict(compare_with_baseline=[1]), "compare_with_baseline"),
    (dict(mask=_png_uri((256, 256), "L")), "mask"),  # a mask without an image
    (dict(image="data:image/png;base64," + base64.b64encode(b"not a picture").decode()), "image"),
    (dict(image=_png_uri((24, 24))), "image"),  # below half the model's native size (the tiny one: 32)
    (dict(image=_png_uri((256, 256)), prompt_strength=0.1), "prompt_strength"),  # int(4 x 0.1) = 0 steps
    (dict(prompt_strength=1.5), "prompt_strength"),
]


@pytest.mark.parametrize("with_mask", [False, True], ids=["img2img", "inpainting"])
def test_an_image_gives_img2img_and_a_mask_inpainting_with_stock_s_images_when_off(server, with_mask):
    inputs = {**FAST, "prompt": "a cat", "seed": 4, "image": _png_uri((264, 256)), "prompt_strength": 0.5,
              "num_inference_steps": 8, "output_format": "png"}
    if with_mask:
        inputs["mask"] = _png_uri((132, 128), "L", white_right_half=True)  # resized to the image's size
    status, body = server.predict({**inputs, "compare_with_baseline": True, "key_step_mode": "off"})
    assert status == 200 and body["status"] == "succeeded", body
    (h1, out), (h2, stock) = images_of(body)
    assert out.size == stock.size == (264, 256)  # the image's size; width and height are not used
    assert out.tobytes() == stock.tobytes()
    logs = body["logs"]
    assert "prompt_strength 0.5 runs 4" in logs and ("mask: 132x128 resized" in logs) == with_mask
    status, body = server.predict(inputs)  # accelerated, the default plan
    assert body["status"] == "succeeded", body
    assert "key steps: [0, 1, 2, 3]" in body["logs"]


def test_many_bad_inputs_get_a_message_naming_the_input_and_the_server_keeps_serving(server):
    for bad, name in SERVER_BAD_INPUTS:
        inputs = {**FAST, "prompt": "a cat", **bad}
        status, body = server.predict(inputs)
        if status == 422:
            message = json.dumps(body["detail"])
        else:
            assert status == 200 and body["status"] == "failed", (bad, body)
            message = body["error"]
            assert "Traceback" not in message, (bad, message)
        assert name in message, (bad, message)
    status, body = server.predict({**FAST, "prompt": "a cat", "seed": 1})
    assert status == 200 and body["status"] == "succeeded", body


def test_prompt_beyond_77_tokens_succeeds_with_a_logged_warning(server):
    status, body = server.predict({**FAST, "prompt": " ".join(["a red cat"] * 60), "seed": 1})
    assert body["status"] == "succeeded", body
    assert "CLIP reads only the first 77" in body["logs"]


def _rss_kib(root: int) -> int:
    """Resident memory of a process and all its descendants, in KiB."""
    import pathlib

    parent, rss = {}, {}
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            status = (proc / "status").read_text()
        except OSError:
            continue
        parent[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(proc.name)] = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0)

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parent.get(pid, 0)
        return False

    return sum(kib for pid, kib in rss.items() if descends(pid))


def test_soak_200_predictions_with_flat_memory(server):
    inputs = {"prompt": "a cat", "num_inference_steps": 1, "width": 256, "height": 256, "output_format": "png"}
    rss = {}
    for i in range(1, 201):
        status, body = server.predict({**inputs, "seed": i, "num_outputs": 1 + i % 2})
        assert status == 200 and body["status"] == "succeeded", (i, body)
        if i in (20, 200):
            rss[i] = _rss_kib(server.proc.pid)
    print(f"soak: server RSS after prediction 20: {rss[20]} KiB, after 200: {rss[200]} KiB")
    assert rss[200] <= 1.10 * rss[20], rss


def test_a_failed_predictions_error_is_our_message_under_cogs_prefix(server):
    status, body = server.predict({**FAST, "prompt": "a cat", "width": 260})
    assert status == 200 and body["status"] == "failed", body
    ours = "ValueError: width must be a multiple of 8, got 260"
    error = body["error"]
    assert error.endswith(ours), error
    prefix = error[: -len(ours)]
    # Nothing of ours before the message: the prefix is cog's own (doubled in cog 0.23.1), as README says.
    assert prefix and set(prefix.split("Prediction failed: ")) == {""}, prefix
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"`error` reads `{prefix}{ours}`" in readme


def test_setup_calibrates_within_its_budget_and_a_bad_budget_fails_setup(weights):
    # asked for on the CPU (the default is on a GPU only); a budget that runs out at once: the paper's plan
    # (that it stopped is logged last in setup, which cog's capture may drop: the library's test checks that line)
    with running(weights, {"FASTERDIFF_CALIBRATE": "1", "FASTERDIFF_CALIBRATION_BUDGET": "0.001"}) as srv:
        logs = srv.health["setup"]["logs"]
        assert "calibration on the spot: DDIM-50 on" in logs and "budget 0.001 s" in logs, logs
        status, body = srv.predict({**FAST, "prompt": "a cat", "seed": 1, "num_inference_steps": 50})
    assert status == 200 and body["status"] == "succeeded", body
    assert "running the paper's key steps" in body["logs"], body["logs"]
    assert not (weights / "fasterdiff_plans.json").exists()  # nothing half-calibrated was kept
    health = _setup_health(weights, {"FASTERDIFF_CALIBRATE": "1", "FASTERDIFF_CALIBRATION_BUDGET": "soon"})
    assert health["status"] == "SETUP_FAILED"
    assert "FASTERDIFF_CALIBRATION_BUDGET must be a positive number of seconds, got 'soon'" in health["setup"]["logs"]
