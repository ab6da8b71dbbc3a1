"""from_pretrained (a folder or a Hub id), push_to_hub against a mocked Hub API, and disable_adapter."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from moelora.errors import AdapterNotFoundError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=128)
IDS = torch.tensor([[5, 9, 3, 7, 1, 2]])


def base(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def trained():
    model = moelora.wrap(base(), moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


class FakeHub:
    """The two Hub calls moelora makes, backed by a folder: repositories are folders, commits copy files."""

    def __init__(self, root: Path):
        self.root, self.repos, self.commits, self.downloads = root, {}, [], []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
                if repo_id in hub.repos and not exist_ok:
                    raise FileExistsError(repo_id)
                hub.repos.setdefault(repo_id, {"private": private})

            def upload_folder(self, repo_id, folder_path, commit_message, revision=None, repo_type=None):
                assert repo_id in hub.repos, "upload to a repository that was not created"
                target = hub.root / repo_id / (revision or "main")
                shutil.copytree(folder_path, target, dirs_exist_ok=True)
                hub.commits.append((repo_id, commit_message, sorted(p.name for p in Path(folder_path).iterdir())))
                return f"https://hub.example/{repo_id}/commit/{len(hub.commits)}"

        return Api()

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, token=None):
        self.downloads.append((repo_id, revision, tuple(allow_patterns or ())))
        source = self.root / repo_id / (revision or "main")
        if not source.is_dir():
            raise LookupError(f"404: {repo_id}")  # the Hub's own error propagates
        target = self.root / "cache" / repo_id.replace("/", "--") / (revision or "main")
        target.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            if (source / name).is_file():
                shutil.copy(source / name, target / name)
        return str(target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_push_to_hub_then_from_pretrained_by_id(hub):
    model = trained()
    url = moelora.push_to_hub(model, "someone/tiny-moelora", private=True, training={"data": "fixture"})
    assert url.endswith("/commit/1") and hub.repos["someone/tiny-moelora"] == {"private": True}
    assert hub.commits == [("someone/tiny-moelora", "Upload MoE-LoRA adapter",
                            ["README.md", "adapter_config.json", "adapter_model.safetensors"])]
    loaded = moelora.from_pretrained(base(), "someone/tiny-moelora")
    assert hub.downloads == [("someone/tiny-moelora", None, ("adapter_config.json", "adapter_model.safetensors",
                                                             "README.md"))]  # the adapter files only
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)
    moelora.push_to_hub(model, "someone/tiny-moelora", revision="v2")  # an existing repository: exist_ok
    assert moelora.from_pretrained(base(), "someone/tiny-moelora", revision="v2") is not None


def test_from_pretrained_of_a_folder_and_of_a_bad_name(tmp_path, hub):
    model = trained()
    moelora.save_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(moelora.from_pretrained(base(), tmp_path / "adapter")(IDS).logits, model(IDS).logits)
    assert hub.downloads == []  # a folder never goes to the Hub
    with pytest.raises(AdapterNotFoundError, match="neither an adapter folder nor a Hub repository id"):
        moelora.from_pretrained(base(), str(tmp_path / "missing"))
    with pytest.raises(LookupError, match="404"):
        moelora.from_pretrained(base(), "someone/absent")


def test_disable_adapter_gives_the_base_and_restores(tmp_path):
    model = trained()
    with_adapter = model(IDS).logits
    plain = base()(IDS).logits
    assert not torch.allclose(with_adapter, plain)
    with moelora.disable_adapter(model):
        torch.testing.assert_close(model(IDS).logits, plain)
    torch.testing.assert_close(model(IDS).logits, with_adapter)
    with pytest.raises(RuntimeError), moelora.disable_adapter(model):
        raise RuntimeError("inside")
    torch.testing.assert_close(model(IDS).logits, with_adapter)  # restored after an exception too
    with pytest.raises(AdapterNotFoundError):
        with moelora.disable_adapter(base()):
            pass
