"""The hf-ddpm Space: sample a DDPM and watch it denoise, see the forward process, compare noise schedules.

Run locally with `make space` (or `python spaces/hf-ddpm/app.py`; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT pick the
address). Set HF_DDPM_MODEL to a Hub repo id or a pipeline folder to serve another model than the bundled one.
The logic lives in ddpm_space.py; this file is the page.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import hashlib  # noqa: E402
import io  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ddpm_space as core  # noqa: E402
import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402

from hf_ddpm import HFDDPMPipeline  # noqa: E402

try:  # ZeroGPU hardware needs GPU work decorated; on other hardware spaces.GPU does nothing
    import spaces

    gpu: Callable = spaces.GPU
except (ImportError, AttributeError):  # not on Spaces, or a repo-root `spaces/` folder imported as a namespace

    def gpu(fn: Callable) -> Callable:
        return fn


# All model work shares one queue slot: two events with their own limits would still sample in parallel.
MODEL_WORK = "model"
MODEL_CONCURRENCY = 1
FORWARD_TILE = 192  # the Forward tab shows one image, so larger
# Samples are a few pixels wide: let the browser scale them as blocks, not blur them.
CSS = "#preview-xt img, #preview-x0 img, #gallery img, .forward-image img { image-rendering: pixelated; }"
INTRO = (
    "# hf-ddpm · denoising diffusion, step by step\n"
    "Sample a DDPM (Ho et al. 2020) with ancestral, DDIM (Song et al. 2021) or predictor-corrector steps, or with "
    "diffusers' DPM-Solver++ and UniPC (good digits in 10 steps), and watch "
    "x_t and the model's guess x̂_0 as noise turns into digits; see the forward process the model learned to undo; "
    "compare noise schedules."
)


def build_demo(model_source: str | None = None) -> gr.Blocks:
    """The page, serving `model_source` (a Hub repo id or a folder; None: the bundled model), its queue set up.

    If `model_source` cannot be loaded, the page says so at the top and serves the bundled model.
    """
    pipe, notice = core.load_pipeline(model_source)
    title = "hf-ddpm: DDPM and DDIM, step by step"
    # Every preview is a file in Gradio's cache: clear those older than an hour, every hour.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(notice, visible=bool(notice), elem_id="model-notice")
        gr.Markdown(core.describe_model(pipe, None if notice else model_source), elem_id="model-info")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate-tab"):
                generate_tab(pipe)
            with gr.Tab("Forward process", id="forward-tab"):
                forward_tab(demo, pipe)
            with gr.Tab("Schedules", id="schedules-tab"):
                schedules_tab(demo, pipe.scheduler.config.num_train_timesteps)
    return demo.queue(max_size=64)


def generate_tab(pipe: HFDDPMPipeline) -> None:
    """Sampler settings and a button; x_t and x̂_0 stream while sampling, then a gallery and a grid PNG."""
    T = pipe.scheduler.config.num_train_timesteps
    spacing_default = pipe.scheduler.config.get("timestep_spacing", "leading")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            sampler = gr.Dropdown(list(core.SAMPLERS), value=core.DDIM, label="Sampler", elem_id="sampler")
            steps = gr.Slider(1, T, value=min(50, T), step=1, label=f"Steps (1 to T = {T})", elem_id="steps")
            eta_label = "η (DDIM only: 0 deterministic, 1 DDPM-like)"
            eta = gr.Slider(0, 1, value=0, step=0.05, label=eta_label, elem_id="eta")
            corrector = gr.Slider(
                1, core.MAX_CORRECTOR_STEPS, value=1, step=1, label="Langevin corrector steps per step",
                visible=False, elem_id="corrector-steps",
            )  # fmt: skip
            spacing = gr.Dropdown(
                list(core.SPACINGS), label="Timestep spacing", elem_id="spacing",
                value=spacing_default if spacing_default in core.SPACINGS else "leading",
            )  # fmt: skip
            seed = gr.Number(0, precision=0, minimum=0, maximum=core.MAX_SEED, label="Seed", elem_id="seed")
            num_images = gr.Slider(1, core.MAX_IMAGES, value=4, step=1, label="Images", elem_id="num-images")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            status = gr.Markdown("Press **Generate** to sample.", elem_id="status")
            with gr.Row():
                shown = dict(format="png", interactive=False)
                preview = gr.Image(label="x_t (current sample)", elem_id="preview-xt", **shown)
                guess = gr.Image(label="x̂_0 (the model's guess of the result)", elem_id="preview-x0", **shown)
            gallery = gr.Gallery(label="Samples", columns=8, height=220, format="png", elem_id="gallery")
            grid_file = gr.File(label="Grid (PNG)", height=100, elem_id="grid-file")
    inputs = [sampler, steps, eta, spacing, seed, num_images, corrector]  # the order of core.GENERATE_INPUTS

    def validate(sampler, steps, eta, spacing, seed, num_images, corrector_steps) -> list[dict]:
        _, errors = core.check_generate_inputs(sampler, steps, eta, spacing, seed, num_images, corrector_steps, T)
        return [gr.validate(name not in errors, errors.get(name, "")) for name in core.GENERATE_INPUTS]

    @gpu
    def generate(sampler, steps, eta, spacing, seed, num_images, corrector_steps) -> Iterator[tuple]:
        """Stream (status, x_t, x̂_0, gallery, grid file): previews while sampling, then the images."""
        raw = (sampler, steps, eta, spacing, seed, num_images, corrector_steps)
        settings, errors = core.check_generate_inputs(*raw, T)
        if settings is None:  # the validator has shown these already, unless a client went around it
            raise gr.Error(" ".join(errors.values()))
        start = time.perf_counter()
        for update in core.sample_stream(pipe, settings):
            if isinstance(update, core.SampleUpdate):
                at = "" if update.timestep is None else f" · t = {update.timestep}"
                status = f"**step {update.step}/{update.total}**{at} · {core.timed(start)}"
                last_run = None if update.step == 0 else gr.skip()  # step 0 clears the last run's gallery and file
                yield status, _grid(update.sample), _grid(update.pred_x0), last_run, last_run
                continue
            images = core.to_uint8(update.images, value_range=(0.0, 1.0))
            grid = core.make_grid(images)
            gallery = [(served(core.upscale(image)), f"#{k + 1}") for k, image in enumerate(images)]
            status = (
                f"**Done:** {settings.num_images} image{'s' * (settings.num_images > 1)} · {settings.sampler}, "
                f"{settings.steps} steps, {settings.spacing} spacing · seed {settings.seed} · {core.timed(start)}"
            )
            download = served(grid, name=f"hf-ddpm_{settings.steps}steps_seed{settings.seed}.png")
            yield status, served(grid), _grid(update.pred_x0), gallery, download

    sampler.change(
        lambda name: (gr.update(interactive=name == core.DDIM), gr.update(visible=name == core.LANGEVIN)),
        sampler,
        [eta, corrector],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    run.click(
        generate,
        inputs=inputs,
        outputs=[status, preview, guess, gallery, grid_file],
        validator=validate,
        # Raw values reach our checks, which name the input and its range (Gradio's preprocessing would answer
        # first, in its own words); every input here is a plain number or string.
        preprocess=False,
        concurrency_id=MODEL_WORK,
        concurrency_limit=MODEL_CONCURRENCY,
        show_progress="minimal",
        api_name="generate",
    )


def _grid(x: Any) -> str | None:
    return None if x is None else served(core.make_grid(core.to_uint8(x)))


def served(image: PIL.Image.Image, name: str = "image.png") -> str:
    """Save `image` as a PNG in Gradio's cache, in a folder named after its content; return the file's path.

    A path to a file already in the cache is served as it is. A PIL image is saved by Gradio on every return, over
    its earlier file when the picture is the same (x_0 for every t, the last preview and the result), and a browser
    fetching that file meanwhile gets a cut-off body.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = Path(gr.utils.get_upload_folder()) / "hf-ddpm" / hashlib.sha256(data).hexdigest() / name
    if path.exists():
        os.utime(path)  # handed out again: Gradio's delete_cache ages files by their change time
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)  # atomic: no one sees a half-written file
    return str(path)


def forward_tab(demo: gr.Blocks, pipe: HFDDPMPipeline) -> None:
    """A digit (or an upload) noised to x_t by q(x_t | x_0) as t moves, with β_t, ᾱ_t and SNR(t)."""
    T = pipe.scheduler.config.num_train_timesteps
    process = core.training_process(pipe)
    digits = core.load_digits()
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            t = gr.Slider(0, T - 1, value=T // 4, step=1, label=f"t (0 to {T - 1})", elem_id="t")
            digit_label = "Sample digit (index into the built-in digits)"
            digit = gr.Slider(0, len(digits) - 1, value=0, step=1, label=digit_label, elem_id="digit")
            noise_seed = gr.Number(
                0, precision=0, minimum=0, maximum=core.MAX_SEED, label="Noise seed (fixes ε)", elem_id="noise-seed"
            )
            upload = gr.Image(
                type="pil", sources=["upload", "clipboard"], label="…or upload an image", height=200, elem_id="upload"
            )
        with gr.Column(scale=2):
            with gr.Row():
                shown = dict(format="png", interactive=False, elem_classes="forward-image")
                x0_image = gr.Image(label="x_0", elem_id="forward-x0", **shown)
                eps_image = gr.Image(label="ε", elem_id="forward-eps", **shown)
                xt_image = gr.Image(label="x_t", elem_id="forward-xt", **shown)
            info = gr.Markdown(
                latex_delimiters=[{"left": "$$", "right": "$$", "display": True}], elem_id="forward-info"
            )

    def forward(index, upload, t, seed) -> tuple[Any, Any, Any, str]:
        errors = core.check_forward_inputs(index, t, seed, len(digits), T)
        if errors:
            raise gr.Error(" ".join(errors))
        image, label = (upload, None) if upload is not None else digits[int(index)]
        view = core.forward_process(process, core.prepare_image(image, pipe), int(t), int(seed))
        source = "your image" if label is None else f"digit #{int(index)} (a {label})"
        pictures = (served(core.upscale(array, FORWARD_TILE)) for array in (view.x0, view.noise, view.x_t))
        return *pictures, f"x_0 is {source}.\n\n" + core.forward_markdown(view, T)

    gr.on(
        [t.change, digit.change, noise_seed.change, upload.change, demo.load],
        forward,
        inputs=[digit, upload, t, noise_seed],
        outputs=[x0_image, eps_image, xt_image, info],
        trigger_mode="always_last",
        show_progress="hidden",
        api_name="forward",
    )


def schedules_tab(demo: gr.Blocks, num_train_timesteps: int) -> None:
    """β_t, ᾱ_t, log SNR(t) and β̃_t against β_t for the chosen schedules over T steps."""
    names = list(core.SCHEDULE_CURVES)
    with gr.Row():
        chosen = gr.CheckboxGroup(names, value=names, label="Schedules", elem_id="schedule-names")
        T = gr.Slider(
            2, core.MAX_PLOT_TIMESTEPS, value=num_train_timesteps, step=1, label="T (diffusion steps)",
            elem_id="schedule-T",
        )  # fmt: skip
    plot = gr.Plot(format="png", label="β_t, ᾱ_t, log SNR(t), β̃_t against β_t", elem_id="schedule-plot")
    table = gr.Markdown(elem_id="schedule-table")

    def schedules(names, T) -> tuple[Any, str]:
        errors = core.check_schedule_inputs(names, T)
        if errors:
            raise gr.Error(" ".join(errors))
        return core.schedule_figure(names, int(T)), core.schedule_markdown(names, int(T))

    gr.on(
        [chosen.change, T.change, demo.load],
        schedules,
        inputs=[chosen, T],
        outputs=[plot, table],
        trigger_mode="always_last",
        api_name="schedules",
    )


def main() -> None:
    """Serve the page; address and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Spaces set them)."""
    core.configure_torch()
    build_demo(os.environ.get(core.MODEL_ENV) or None).launch(css=CSS)


if __name__ == "__main__":
    main()
