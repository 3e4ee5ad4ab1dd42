"""The local Hub server against the real clients: `huggingface_hub` for the API, diffusers for a model round trip.

No mocks: every call goes over HTTP to `tests/hub_server.py`, which `HF_ENDPOINT` points at (see conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import run_python
from hub_server import HubServer, check_front_matter
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils.sha import git_hash

README = textwrap.dedent(
    """\
    ---
    license: apache-2.0
    tags:
    - test
    - "with: colon"
    library_name: diffusers
    ---
    # A test repo
    """
)


@pytest.fixture(autouse=True)
def no_server_failures(hub_server: HubServer) -> Iterator[None]:
    """Every test: the server never answered 5xx (clients would retry for minutes) and hit no bug or unknown route."""
    starts = len(hub_server.status_log), len(hub_server.internal_errors), len(hub_server.unhandled)
    yield
    assert [s for s in hub_server.status_log[starts[0] :] if s[2] >= 500] == []
    assert hub_server.internal_errors[starts[1] :] == []
    assert hub_server.unhandled[starts[2] :] == []


@dataclass
class UploadedRepo:
    """A model repo uploaded once per module (per xdist worker) and only read by the tests using it."""

    repo_id: str
    folder: Path
    sha: str


@pytest.fixture(scope="module")
def uploaded_repo(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> UploadedRepo:
    """Upload a text file, a binary LFS file and a README with front matter, checking the LFS upload path ran."""
    folder = tmp_path_factory.mktemp("upload")
    (folder / "notes.txt").write_text("hello hub\n")
    # > 1 MB and binary (NULs guaranteed): must take the LFS path (preupload -> batch -> PUT -> lfsFile).
    (folder / "weights").mkdir()
    (folder / "weights" / "blob.bin").write_bytes(bytes(range(256)) * 4200)
    (folder / "README.md").write_text(README)
    api = HfApi()
    api.create_repo("org/files")
    start = len(hub_server.request_log)
    info = api.upload_folder(repo_id="org/files", folder_path=folder, commit_message="add files")
    calls = hub_server.request_log[start:]
    assert ("POST", "/api/validate-yaml") in calls
    assert ("POST", "/org/files.git/info/lfs/objects/batch") in calls
    assert any(method == "PUT" and path.startswith("/_lfs/") for method, path in calls)
    return UploadedRepo("org/files", folder, info.oid)


def test_create_repo_twice_with_exist_ok(hub_server: HubServer) -> None:
    api = HfApi()
    url = api.create_repo("org/twice")
    assert url == f"{hub_server.url}/org/twice"
    assert api.create_repo("org/twice", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("org/twice")
    assert excinfo.value.response.status_code == 409
    # A new repo has a first commit, like on the Hub.
    assert len(api.model_info("org/twice").sha) == 40


def test_model_info_and_file_list(uploaded_repo: UploadedRepo) -> None:
    api = HfApi()
    info = api.model_info(uploaded_repo.repo_id, files_metadata=True)
    assert info.sha == uploaded_repo.sha
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "notes.txt", "weights/blob.bin"}
    blob = (uploaded_repo.folder / "weights" / "blob.bin").read_bytes()
    assert siblings["weights/blob.bin"].lfs.sha256 == hashlib.sha256(blob).hexdigest()
    assert siblings["weights/blob.bin"].size == len(blob)
    assert siblings["notes.txt"].lfs is None
    assert siblings["notes.txt"].blob_id == git_hash(b"hello hub\n")
    assert sorted(api.list_repo_files(uploaded_repo.repo_id)) == sorted(siblings)
    tree = {item.path: item for item in api.list_repo_tree(uploaded_repo.repo_id)}
    assert set(tree) == {".gitattributes", "README.md", "notes.txt", "weights"}  # not recursive


def test_hf_hub_download_checks_etag_and_bytes(hub_server: HubServer, uploaded_repo: UploadedRepo, tmp_path: Path):
    repo_id, sha = uploaded_repo.repo_id, uploaded_repo.sha
    for filename in ("notes.txt", "weights/blob.bin"):
        expected = (uploaded_repo.folder / filename).read_bytes()
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename))
        is_lfs = filename.endswith(".bin")
        assert meta.etag == (hashlib.sha256(expected).hexdigest() if is_lfs else git_hash(expected))
        assert (meta.commit_hash, meta.size) == (sha, len(expected))

        start = len(hub_server.request_log)
        path = hf_hub_download(repo_id, filename, cache_dir=tmp_path)
        assert Path(path).read_bytes() == expected
        assert f"/snapshots/{sha}/" in Path(path).as_posix()
        assert hub_server.request_log[start:] == [
            ("HEAD", f"/{repo_id}/resolve/main/{filename}"),
            ("GET", f"/{repo_id}/resolve/main/{filename}"),
        ]


def test_range_request_resumes_download(uploaded_repo: UploadedRepo) -> None:
    expected = (uploaded_repo.folder / "weights" / "blob.bin").read_bytes()
    resumed = io.BytesIO(expected[:1000])
    resumed.seek(0, io.SEEK_END)
    http_get(hf_hub_url(uploaded_repo.repo_id, "weights/blob.bin"), resumed, resume_size=1000)
    assert resumed.getvalue() == expected


def test_snapshot_download_in_fresh_process(hub_server: HubServer, uploaded_repo: UploadedRepo, fresh_hf_cache: Path):
    start = len(hub_server.request_log)
    code = f"""
import json, os
from huggingface_hub import snapshot_download
folder = snapshot_download({uploaded_repo.repo_id!r})
files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
print(json.dumps({{"folder": folder, "files": files}}))
"""
    result = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    folder = Path(result["folder"])
    assert folder.is_relative_to(fresh_hf_cache) and folder.name == uploaded_repo.sha
    assert result["files"] == [".gitattributes", "README.md", "notes.txt", "weights/blob.bin"]
    for name in ("README.md", "notes.txt", "weights/blob.bin"):
        assert (folder / name).read_bytes() == (uploaded_repo.folder / name).read_bytes()
    calls = hub_server.request_log[start:]
    assert ("GET", f"/api/models/{uploaded_repo.repo_id}/tree/{uploaded_repo.sha}") in calls
    assert ("GET", f"/{uploaded_repo.repo_id}/resolve/{uploaded_repo.sha}/weights/blob.bin") in calls


def test_deleting_commit_keeps_older_revisions(tmp_path: Path) -> None:
    api = HfApi()
    repo_id = "org/history"
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"keep\n", path_in_repo="keep.txt", repo_id=repo_id).oid
    second = api.upload_folder(repo_id=repo_id, folder_path=_folder(tmp_path / "src", {"d/x.txt": b"x", "gone": b"1"}))
    third = api.delete_file("gone", repo_id=repo_id).oid
    fourth = api.delete_folder("d", repo_id=repo_id).oid
    assert len({first, second.oid, third, fourth}) == 4
    assert api.list_repo_files(repo_id) == [".gitattributes", "keep.txt"]
    assert api.model_info(repo_id, revision=second.oid).sha == second.oid
    old = hf_hub_download(repo_id, "gone", revision=second.oid, cache_dir=tmp_path / "cache")
    assert Path(old).read_bytes() == b"1"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "gone", cache_dir=tmp_path / "cache")
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:4] == [fourth, third, second.oid, first]
    with pytest.raises(EntryNotFoundError):  # deleting what is not there is a typed 404, not a server error
        api.delete_file("gone", repo_id=repo_id)


def test_typed_errors(uploaded_repo: UploadedRepo, tmp_path: Path) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "notes.txt", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(uploaded_repo.repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(uploaded_repo.repo_id, "notes.txt", revision="0" * 40, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(uploaded_repo.repo_id, "missing.txt", cache_dir=tmp_path)
    assert excinfo.value.response.headers["X-Repo-Commit"] == uploaded_repo.sha


def test_invalid_yaml_front_matter_is_rejected() -> None:
    assert check_front_matter(README) == ([], [])
    assert check_front_matter("# no metadata\n")[1]  # only a warning, like the Hub
    for broken in ("---\nlicense: mit\n", "---\nlicense mit\n---\n", "---\ntags: [a, b\n---\n", "---\n\ta: 1\n---\n"):
        assert check_front_matter(broken)[0], broken
    api = HfApi()
    api.create_repo("org/bad-card")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\nlicense mit\n---\n", path_in_repo="README.md", repo_id="org/bad-card")
    assert api.list_repo_files("org/bad-card") == [".gitattributes"]  # rejected before anything was committed


@pytest.mark.parametrize("repo_type", ["space", "dataset"])
def test_other_repo_types(hub_server: HubServer, repo_type: str, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = f"org/my-{repo_type}"
    url = api.create_repo(repo_id, repo_type=repo_type, space_sdk="gradio" if repo_type == "space" else None)
    assert url == f"{hub_server.url}/{repo_type}s/{repo_id}"
    # A binary file with no LFS pattern of `.gitattributes`: the server must still pick LFS from its content.
    files = {"app.py": b"print('hi')\n", "assets/logo.png": b"\x89PNG\r\n\x1a\n\x00" * 10}
    api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=_folder(tmp_path / "src", files))
    info = api.repo_info(repo_id, repo_type=repo_type, files_metadata=True)
    assert {s.rfilename: s.lfs is not None for s in info.siblings} == {
        ".gitattributes": False,
        "app.py": False,
        "assets/logo.png": True,
    }
    for name, content in files.items():
        path = hf_hub_download(repo_id, name, repo_type=repo_type, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == content
    assert ("HEAD", f"/{repo_type}s/{repo_id}/resolve/main/app.py") in hub_server.request_log
    with pytest.raises(RepositoryNotFoundError):  # same name, other type
        api.model_info(repo_id)


def test_diffusers_unet_round_trip(hub_server: HubServer, fresh_hf_cache: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    start = len(hub_server.status_log)
    unet.push_to_hub("org/tiny-unet")
    pushed = hub_server.status_log[start:]
    # diffusers probes for an existing model card (a typed 404) before writing its own.
    assert ("HEAD", "/org/tiny-unet/resolve/main/README.md", 404) in pushed
    assert ("POST", "/api/models/org/tiny-unet/commit/main", 200) in pushed
    files = HfApi().list_repo_files("org/tiny-unet")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(files)

    start = len(hub_server.request_log)
    out = tmp_path / "loaded.safetensors"
    run_python(
        f"""
from diffusers import UNet2DModel
from safetensors.torch import save_file
model = UNet2DModel.from_pretrained("org/tiny-unet")
save_file(model.state_dict(), {str(out)!r})
"""
    )
    loading = hub_server.request_log[start:]
    assert ("GET", "/api/models/org/tiny-unet") in loading  # the online path: revision resolved, files fetched
    assert any(
        method == "GET"
        and path.startswith("/org/tiny-unet/resolve/")
        and path.endswith("/diffusion_pytorch_model.safetensors")
        for method, path in loading
    ), loading
    loaded, original = load_file(out), unet.state_dict()
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    """Write `files` (relative path -> bytes) under `root` and return it."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root
