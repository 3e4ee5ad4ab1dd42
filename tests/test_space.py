"""The Space (spaces/hf-ddpm): its endpoints through gradio_client against the real entry point, its logic in-process,
and its deployment to the local Hub server.

The app runs as `python spaces/hf-ddpm/app.py` in a subprocess, bound by GRADIO_SERVER_NAME/PORT as on a Space.
`running_space` (helpers.py) starts it; test_space_browser.py drives it in a browser.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import SPACE_DIR, free_port, generate_on_space, running_space, served_image

sys.path.insert(0, str(SPACE_DIR))  # app.py imports its sibling ddpm_space, as on a Space

import ddpm_space as core  # noqa: E402

from hf_ddpm import DDPMUNet, HFDDPMPipeline  # noqa: E402
from hf_ddpm.diffusion import GaussianDiffusion  # noqa: E402
from hf_ddpm.schedules import make_betas  # noqa: E402

UNREACHABLE_MODEL = "hf-ddpm-test/unreachable"


@pytest.fixture(scope="module")
def space_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Space asked (via HF_DDPM_MODEL) for a model on a Hub that cannot be reached: it serves the bundled one."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {core.MODEL_ENV: UNREACHABLE_MODEL, "HF_ENDPOINT": endpoint}
    with running_space(tmp_path_factory.mktemp("space"), env) as url:
        yield url


@pytest.fixture(scope="module")
def client(space_url: str):
    from gradio_client import Client

    # Files are fetched by the tests themselves: downloading every streamed preview would only slow them down.
    return Client(space_url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def bundled() -> HFDDPMPipeline:
    pipe, notice = core.load_pipeline(None)
    assert notice == ""
    return pipe


def _pixels(file: dict | str) -> np.ndarray:
    return np.asarray(served_image(file))


# --- through gradio_client ---------------------------------------------------------------------------------------


def test_page_says_the_named_model_could_not_be_loaded(space_url: str):
    config = httpx.get(space_url + "config", timeout=30).json()
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    notice = props["model-notice"]
    assert notice["visible"] is True
    assert UNREACHABLE_MODEL in notice["value"] and "could not be reached" in notice["value"]
    assert "bundled digits model" in notice["value"]
    assert "bundled digits DDPM" in props["model-info"]["value"]


def test_generate_streams_previews_then_images_of_the_right_size(client, bundled):
    channels, height, width = core.image_shape(bundled)
    job = generate_on_space(client, steps=8, num_images=3)
    status, x_t, x0, gallery, grid_file = job.result(timeout=120)
    outputs = [out for out in job.outputs() if isinstance(out, tuple)]
    assert outputs[0][0].startswith("**step 0/8**")  # x_T, at once
    assert any(out[0].startswith("**step ") and "/8**" in out[0] and "step 0/" not in out[0] for out in outputs)
    assert status.startswith("**Done:** 3 images")
    grid = core.grid_size(3, height, width)
    assert served_image(x_t).size == served_image(x0).size == served_image(grid_file).size == grid
    assert grid_file["orig_name"] == "hf-ddpm_8steps_seed0.png"
    assert served_image(grid_file).mode == ("L" if channels == 1 else "RGB")
    assert [item["caption"] for item in gallery] == ["#1", "#2", "#3"]
    tile = core.upscale(np.zeros((height, width, channels), np.uint8)).size
    assert all(served_image(item["image"]).size == tile for item in gallery)


def test_same_seed_same_images(client):
    def images(seed: int) -> list[np.ndarray]:
        gallery = generate_on_space(client, sampler="DDPM ancestral", steps=4, seed=seed, num_images=2).result(
            timeout=120
        )[3]
        return [_pixels(item["image"]) for item in gallery]

    first, again, other = images(7), images(7), images(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_forward_endpoint(client, bundled):
    T = bundled.scheduler.config.num_train_timesteps
    x0, eps, x_t, info = client.predict(3, None, 500, 0, api_name="/forward")
    size = core.upscale(np.zeros((*core.image_shape(bundled)[1:], 1), np.uint8), 192).size
    assert served_image(x0).size == served_image(eps).size == served_image(x_t).size == size
    # The values come from the model's own schedule (computed here independently of the app).
    config = bundled.scheduler.config
    process = GaussianDiffusion(make_betas(config.beta_schedule, T, config.beta_start, config.beta_end))
    alpha_bar, beta = float(process.alphas_cumprod[500]), float(process.betas[500])
    assert f"| {beta:.4g} | {alpha_bar:.4g} |" in info
    assert "digit #3 (a 3)" in info and "\\sqrt{\\bar\\alpha_t}" in info
    # ε is fixed by the seed: the same request gives the same x_t; another t another one.
    again = client.predict(3, None, 500, 0, api_name="/forward")[2]
    later = client.predict(3, None, 900, 0, api_name="/forward")[2]
    assert np.array_equal(_pixels(x_t), _pixels(again)) and not np.array_equal(_pixels(x_t), _pixels(later))


def test_schedules_endpoint(client):
    plot, table = client.predict(["linear", "cosine", "linear, zero terminal SNR"], 1000, api_name="/schedules")
    assert plot["type"] == "matplotlib"
    assert served_image(plot["plot"]).size == (1100, 750)  # figsize (11, 7.5) at 100 dpi
    assert "| cosine |" in table and "| linear, zero terminal SNR |" in table and "| quadratic |" not in table
    assert "| 0 | -inf |" in table  # ᾱ_{T-1} = 0 for the zero-terminal-SNR schedule


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (dict(steps=0), "steps: Steps must be a whole number from 1 to 1000"),
        (dict(steps=1001), "steps: Steps must be a whole number from 1 to 1000"),
        (dict(num_images=17), "num_images: Number of images must be a whole number from 1 to 16"),
        (dict(seed="abc"), "seed: Seed must be a whole number from 0 to 4294967295; got 'abc'"),
        (dict(eta=1.5), "eta: η must be a number from 0"),
        (dict(sampler="Euler"), "sampler: Sampler must be one of"),
    ],
)
def test_bad_inputs_get_a_clear_message_and_the_app_keeps_serving(client, inputs, message):
    from gradio_client.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        generate_on_space(client, **inputs).result(timeout=60)
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    assert generate_on_space(client, steps=2, num_images=1).result(timeout=120)[0].startswith("**Done:**")


def test_forward_bad_inputs(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="t must be a whole number from 0 to 999; got 2.5"):
        client.predict(3, None, 2.5, 0, api_name="/forward")
    with pytest.raises(AppError, match="greater than maximum value"):  # Gradio's own bound check answers first
        client.predict(3, None, 5000, 0, api_name="/forward")
    assert client.predict(3, None, 10, 0, api_name="/forward")[3].startswith("x_0 is digit #3")


def test_ten_concurrent_generate_requests_finish_in_queue_order(client):
    from gradio_client.utils import Status

    finished: list[int] = []
    lock = threading.Lock()
    jobs = []
    for k in range(10):

        def done(*outputs, k=k):
            with lock:
                finished.append(k)

        job = client.submit("DDIM", 20, 0.0, "trailing", k, 1, 1, api_name="/generate", result_callbacks=[done])
        deadline = time.monotonic() + 60
        # Wait until the server has queued it, so that the submission order is the queue order.
        while job.status().code in (Status.STARTING, Status.JOINING_QUEUE) and not job.done():
            assert time.monotonic() < deadline, "a request was never queued"
            time.sleep(0.02)
        jobs.append(job)
    with lock:
        assert len(finished) <= 5, "the requests hardly overlapped: make each one longer"
    results = [job.result(timeout=180) for job in jobs]
    for k, (status, *_) in enumerate(results):
        assert status.startswith("**Done:** 1 image") and f"seed {k}" in status
    deadline = time.monotonic() + 10
    while len(finished) < 10 and time.monotonic() < deadline:  # callbacks run on the client's threads
        time.sleep(0.05)
    assert finished == list(range(10))


# --- in-process --------------------------------------------------------------------------------------------------


def test_checks_name_each_bad_input():
    settings, errors = core.check_generate_inputs("DDIM", 50, 0.0, "leading", 0, 4, 1, 1000)
    assert errors == {} and settings == core.GenerateSettings("DDIM", 50, 0.0, "leading", 0, 4, 1)
    assert core.check_generate_inputs("DDIM", 50.0, "0.5", "leading", "12", 4.0, 1, 1000)[0].seed == 12
    settings, errors = core.check_generate_inputs("x", 0, -1, "x", -1, 0, 0, 1000)
    assert settings is None and set(errors) == set(core.GENERATE_INPUTS)
    _, errors = core.check_generate_inputs("DDIM", True, float("nan"), "leading", 1.5, None, 1, 1000)
    assert set(errors) == {"steps", "eta", "seed", "num_images"}
    assert core.check_forward_inputs(0, 999, 0, 10, 1000) == []
    assert len(core.check_forward_inputs(10, 1000, "x", 10, 1000)) == 3
    assert core.check_schedule_inputs(["cosine"], 2) == []
    assert len(core.check_schedule_inputs(["nope"], 1)) == 2


def test_diffusers_solvers_are_offered_the_users_way(bundled):
    """DPM-Solver++ and UniPC are diffusers' own classes from the model's config (its λ clip and x̂_0 clipping
    included), at the chosen spacing; an unknown sampler is refused with the allowed names."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    config = bundled.scheduler.config
    dpm = core.make_scheduler(config, core.DPM_SOLVER, "leading")
    assert type(dpm) is DPMSolverMultistepScheduler and dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.solver_order == 2 and dpm.config.timestep_spacing == "leading"
    assert dpm.config.lambda_min_clipped == config.lambda_min_clipped and dpm.config.thresholding
    unipc = core.make_scheduler(config, core.UNIPC, "trailing")
    assert type(unipc) is UniPCMultistepScheduler and unipc.config.timestep_spacing == "trailing"
    assert unipc.config.beta_schedule == config.beta_schedule
    with pytest.raises(ValueError, match=r"Unknown sampler 'Euler'; allowed: .*DPM-Solver\+\+ \(2M\), UniPC"):
        core.make_scheduler(config, "Euler", "leading")
    _, errors = core.check_generate_inputs("Euler", 10, 0.0, "leading", 0, 1, 1, 1000)
    assert set(errors) == {"sampler"} and "DPM-Solver++ (2M)" in errors["sampler"] and "UniPC" in errors["sampler"]
    settings, errors = core.check_generate_inputs(core.UNIPC, 10, 0.0, "trailing", 0, 1, 1, 1000)
    assert errors == {} and settings.sampler == core.UNIPC


def test_solver_stream_counts_the_steps_it_takes(bundled):
    """DPM-Solver++ clips the cosine schedule's λ range, so 1000 asked steps are fewer taken: the stream counts those."""
    settings = core.GenerateSettings(core.DPM_SOLVER, 1000, 0.0, "trailing", 0, 1, 1)
    stream = core.sample_stream(bundled, settings)
    first, second = next(stream), next(stream)
    stream.close()
    scheduler = core.make_scheduler(bundled.scheduler.config, core.DPM_SOLVER, "trailing")
    scheduler.set_timesteps(1000)
    assert first.step == 0 and first.total == second.total == len(scheduler.timesteps) < 1000


def test_generate_with_dpm_solver(client):
    status = generate_on_space(client, sampler=core.DPM_SOLVER, steps=5, num_images=2).result(timeout=120)[0]
    assert status.startswith("**Done:** 2 images · DPM-Solver++ (2M), 5 steps")


def test_stream_matches_the_pipeline_and_stops_when_closed(bundled):
    """The streamed images are the pipeline's own for that seed; closing the stream stops the sampler thread."""
    for sampler in core.SAMPLERS:
        settings = core.GenerateSettings(sampler, 4, 0.5, "trailing", 3, 2, 1)
        *updates, result = core.sample_stream(bundled, settings)
        assert [u.step for u in updates][0] == 0 and updates[-1].step == 4  # the newest update is never skipped
        runner = HFDDPMPipeline(
            unet=bundled.unet, scheduler=core.make_scheduler(bundled.scheduler.config, sampler, "trailing")
        )
        runner.set_progress_bar_config(disable=True)
        expected = runner(
            batch_size=2,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(3),
            eta=0.5 if sampler == core.DDIM else 0.0,
            corrector_steps=1 if sampler == core.LANGEVIN else 0,
            output_type="np",
        ).images
        np.testing.assert_array_equal(result.images, expected)
        if sampler in core.DIFFUSERS_SOLVERS:  # their step outputs carry no x̂_0: the preview stays empty
            assert result.pred_x0 is None
        else:
            assert result.pred_x0.shape == (2, *core.image_shape(bundled))
    stream = core.sample_stream(bundled, core.GenerateSettings(core.DDPM, 1000, 0.0, "leading", 0, 1, 1))
    next(stream), next(stream)
    stream.close()
    assert not any(thread.name == "hf-ddpm-sampler" for thread in threading.enumerate())


def test_load_pipeline_falls_back_and_build_demo_shows_it(hub_server, tmp_path):
    pipe, notice = core.load_pipeline("hf-ddpm-test/no-such-model")  # the local Hub answers 404
    assert "no such model repository" in notice and "hf-ddpm-test/no-such-model" in notice
    assert pipe.unet.config == core.load_pipeline(None)[0].unet.config
    assert "no such folder" in core.load_pipeline(str(tmp_path / "missing"))[1]
    (tmp_path / "empty").mkdir()
    assert "Serving the bundled digits model instead" in core.load_pipeline(str(tmp_path / "empty"))[1]

    import app

    demo = app.build_demo(str(tmp_path / "missing"))
    (shown,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-notice"]
    assert shown.visible and "no such folder" in shown.value
    # The generate function checks its inputs itself too (a client could go around the validator).
    (generate,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    assert generate.concurrency_id == app.MODEL_WORK and generate.concurrency_limit == 1
    with pytest.raises(app.gr.Error, match="Steps must be a whole number from 1 to 1000"):
        next(generate.fn("DDIM", 0, 0.0, "leading", 0, 4, 1))


# --- the Space folder and its deployment -------------------------------------------------------------------------


def test_front_matter_and_requirements():
    import gradio
    from huggingface_hub import SpaceCard
    from packaging.requirements import Requirement

    data = SpaceCard.load(SPACE_DIR / "README.md").data
    assert data.sdk == "gradio" and data.sdk_version == gradio.__version__  # pinned to the tested Gradio
    assert data.app_file == "app.py" and data.license == "apache-2.0" and data.python_version
    for key in ("title", "emoji", "colorFrom", "colorTo", "short_description", "models", "tags"):
        assert data.get(key), key
    assert data.get("pinned") is False and len(data.short_description) <= 60
    from hf_ddpm.space_deploy import package_requirements

    # What the deploy writes into the Space's requirements.txt (the package is vendored, Gradio is sdk_version's).
    requirements = [Requirement(line) for line in package_requirements()]
    names = {r.name.lower() for r in requirements}
    assert "gradio" not in names and "hf-ddpm" not in names
    assert {"torch", "diffusers", "matplotlib", "scikit-learn"} <= names  # app, pipeline, plots, built-in digits
    for requirement in requirements:  # every pin holds for what the tests ran with
        assert requirement.specifier.contains(metadata.version(requirement.name), prereleases=True), requirement
    model_files = {
        p.relative_to(SPACE_DIR / "model").as_posix() for p in (SPACE_DIR / "model").rglob("*") if p.is_file()
    }
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= model_files
    assert "unet/diffusion_pytorch_model.safetensors" in model_files
    assert sum((SPACE_DIR / "model" / f).stat().st_size for f in model_files) < 8 * 2**20


def test_deploys_to_the_hub_and_passes_its_yaml_check(hub_server, tmp_path):
    import shutil

    from huggingface_hub import HfApi, SpaceCard

    from hf_ddpm import space_deploy

    folder = tmp_path / "hf-ddpm"
    shutil.copytree(SPACE_DIR, folder, ignore=shutil.ignore_patterns(".gradio"))
    (folder / "__pycache__").mkdir(exist_ok=True)
    (folder / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
    space_deploy.main(["--repo_id", "hf-ddpm-test/hf-ddpm", "--folder", str(folder)])
    space_deploy.deploy_space("hf-ddpm-test/hf-ddpm", folder)  # again: exist_ok, a second commit
    files = set(HfApi().list_repo_files("hf-ddpm-test/hf-ddpm", repo_type="space"))
    assert {"app.py", "ddpm_space.py", "README.md", "requirements.txt", "model/model_index.json"} <= files
    assert {"hf_ddpm/__init__.py", "hf_ddpm/_version.py", "hf_ddpm/pipeline.py"} <= files  # vendored
    assert "model/unet/diffusion_pytorch_model.safetensors" in files
    assert not any("__pycache__" in name for name in files)
    assert ("POST", "/api/validate-yaml") in hub_server.request_log  # upload_folder had the README checked
    # The Hub's YAML check, directly and through huggingface_hub.
    content = (SPACE_DIR / "README.md").read_text()
    answer = httpx.post(f"{hub_server.url}/api/validate-yaml", json={"content": content, "repoType": "space"})
    assert answer.status_code == 200 and answer.json()["errors"] == []
    SpaceCard.load(SPACE_DIR / "README.md").validate(repo_type="space")
    with pytest.raises(ValueError, match="lists 'gradio"):
        (folder / "requirements.txt").write_text("gradio==6.31.0\n")
        space_deploy.deploy_space("hf-ddpm-test/hf-ddpm", folder)


def test_bundled_model_is_the_digits_recipe(bundled) -> None:
    """The bundled model is what spaces/hf-ddpm/README.md says reproduces it (`train.py --preset digits`): the same
    U-Net config and noise process, so a change of the recipe cannot leave a stale model behind unnoticed."""
    from hf_ddpm.training import parse_args
    from hf_ddpm.training.args import TRAINING_PRESETS
    from hf_ddpm.training.components import build_noise_scheduler, unet_config

    args = parse_args(["--preset", "digits"])
    # Through JSON, as the bundle was saved: tuples in a fresh config are lists in a loaded one.
    expected_unet = json.loads(DDPMUNet(**unet_config(args, channels=1)).to_json_string())
    for key, value in expected_unet.items():
        if not key.startswith("_"):
            assert json.loads(json.dumps(bundled.unet.config[key])) == value, key
    expected_scheduler = build_noise_scheduler(args).config
    for key in ("num_train_timesteps", "beta_schedule", "prediction_type", "variance_type", "timestep_spacing"):
        assert bundled.scheduler.config[key] == expected_scheduler[key], key
    # The rest of the recipe (steps, learning rate, EMA, min-SNR, ...): the run's own record, bundled beside it.
    recorded = json.loads((Path(core.__file__).parent / "model" / "training_config.json").read_text())
    for key, value in TRAINING_PRESETS["digits"].items():
        assert recorded[key] == json.loads(json.dumps(value)), key
    assert (recorded["preset"], recorded["seed"], recorded["num_processes"]) == ("digits", 0, 1)
