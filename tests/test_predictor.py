"""predict.py through cog's real HTTP server, on a tiny pipeline saved offline."""

import base64
import io
import json
import subprocess
import sys

import pytest
from cog_server import ROOT, CogServer
from PIL import Image

import fasterdiff
from fasterdiff.service import BOUNDS

FAST = dict(num_inference_steps=4, width=256, height=256)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    fasterdiff.tiny.tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(weights):
    srv = CogServer(weights)
    try:
        health = srv.wait_setup()
        assert health["status"] == "READY", health
        yield srv
    finally:
        srv.stop()


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
    assert f"seed: {inputs['seed']}" in logs and "key steps:" in logs and "encoder calls saved:" in logs
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
        "prompt", "negative_prompt", "width", "height", "num_outputs", "sampler", "num_inference_steps",
        "key_step_mode", "uniform_interval", "custom_key_steps", "parallel", "noise_injection_strength",
        "guidance_scale", "seed", "output_format", "output_quality", "disable_safety_checker",
        "compare_with_baseline",
    ]
    assert sorted(props, key=lambda k: props[k]["x-order"]) == expected
    assert schema["Input"]["required"] == ["prompt"]
    for name in expected:
        assert props[name].get("description"), name
        if name in BOUNDS:
            assert (props[name]["minimum"], props[name]["maximum"]) == BOUNDS[name], name
    assert props["width"]["type"] == "integer" and props["width"]["default"] == 512
    assert props["noise_injection_strength"]["type"] == "number" and props["noise_injection_strength"]["default"] == 0.003
    assert props["parallel"]["type"] == "boolean" and props["parallel"]["default"] is True
    assert props["seed"]["nullable"] is True
    assert schema["sampler"]["enum"] == list(fasterdiff.SAMPLER_NAMES)
    assert schema["key_step_mode"]["enum"] == ["non-uniform", "uniform", "custom", "off"]
    assert schema["output_format"]["enum"] == ["webp", "jpg", "png"]
    assert props["key_step_mode"]["default"] == "non-uniform"


def test_checked_in_schema_is_what_the_generator_writes():
    result = subprocess.run(
        [sys.executable, "scripts/cog_openapi_schema.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


BAD_INPUTS = [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(sampler="LMS"), "sampler"),
    (dict(key_step_mode="custom", custom_key_steps="0,,3"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="0,2,99"), "custom_key_steps"),
    (dict(key_step_mode="custom", custom_key_steps="3,2"), "custom_key_steps"),
    (dict(width=500), "width"),
    (dict(num_outputs=5), "num_outputs"),
]


@pytest.mark.parametrize("bad, name", BAD_INPUTS, ids=[b[1] + "=" + str(list(b[0].values())[-1]) for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message_naming_it(server, bad, name):
    status, body = server.predict({**FAST, "prompt": "a cat", **bad})
    if status == 422:
        assert name in json.dumps(body["detail"])
    else:
        assert status == 200 and body["status"] == "failed", body
        assert name in body["error"]


def test_missing_weights_offline_fail_setup_with_the_download_command(tmp_path):
    srv = CogServer(tmp_path / "empty")
    try:
        health = srv.wait_setup()
    finally:
        srv.stop()
    assert health["status"] == "SETUP_FAILED"
    assert "python -m fasterdiff download-weights" in health["setup"]["logs"]


def test_cli_generates_a_file(weights, tmp_path):
    out = tmp_path / "cat.png"
    result = subprocess.run(
        [sys.executable, "-m", "fasterdiff", "generate", "a cat", "--weights", str(weights), "--steps", "3",
         "--width", "256", "--height", "256", "--seed", "5", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "seed: 5" in result.stdout and "key steps:" in result.stdout
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (256, 256)


def test_cli_help_and_bad_argument():
    help_text = subprocess.run([sys.executable, "-m", "fasterdiff", "generate", "--help"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    for flag in ("--steps", "--key-step-mode", "--custom-key-steps", "--sampler", "--seed", "--sequential"):
        assert flag in help_text
    bad = subprocess.run([sys.executable, "-m", "fasterdiff", "generate", "a cat", "--width", "5000"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--width" in bad.stderr
