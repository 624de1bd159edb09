"""`prefopt export` (its options and help: prefopt/cli.py): the run's newest valid checkpoint's policy as one plain HF
model directory with a model card (prefopt/run/modelcard.py), and its upload to the Hugging Face Hub.

LoRA adapters are merged into the base model named in the run's frozen config; a full fine-tune is copied as is.
The directory is built beside its target and renamed into place, so it is always whole; the upload comes after,
so a failed push (offline, not logged in) leaves a complete export to push later.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from prefopt.core.errors import HubError
from prefopt.core.fileutil import atomic_write_text
from prefopt.core.hub import hub_offline
from prefopt.core.runfiles import CONFIG_FILE, POLICY_DIR, SUMMARY_FILE
from prefopt.model.loading import load_model, load_tokenizer, resolve_model_source
from prefopt.run.modelcard import model_card
from prefopt.run.worker import load_frozen_config
from prefopt.train.checkpoint import find_checkpoint, load_trainer_state
from prefopt.train.engine import is_adapter_dir

CARD_FILE = "README.md"  # the Hub shows it as the model's page


def read_run_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary.json, or None when it has none (the run did not finish) or it is unreadable."""
    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def export_policy(run_dir: Path, output_dir: Path, title: Optional[str] = None) -> Path:
    """Export the run's newest valid checkpoint's policy (LoRA merged) with its model card into output_dir."""

    checkpoint = find_checkpoint(str(run_dir), run_dir, key="RUN_DIR")
    policy_dir = checkpoint / POLICY_DIR
    cfg = load_frozen_config(checkpoint / CONFIG_FILE)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        merged = is_adapter_dir(policy_dir)
        if merged:
            from peft import PeftModel

            source = resolve_model_source(cfg.model)
            tokenizer = load_tokenizer(cfg.model, source)
            # a QLoRA run's adapters merge into the whole base weights, not into their quantized copy
            base = load_model(cfg.model, source, len(tokenizer), cfg.trainer.seed, quantize=False)
            merged_model = PeftModel.from_pretrained(base, policy_dir).merge_and_unload()
            merged_model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        else:
            shutil.copytree(policy_dir, staging, dirs_exist_ok=True)
        step = int(load_trainer_state(checkpoint)["step"])
        card = model_card(
            cfg, step, checkpoint.name, read_run_summary(run_dir), title or output_dir.name, merged_lora=merged
        )
        atomic_write_text(
            staging / CARD_FILE, card
        )  # inside the staging dir: the export appears with its card or not at all
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.replace(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def unreachable(error: BaseException) -> bool:
    """No connection to the hub: offline mode (a ConnectionError), a socket error, or the HTTP client's transport
    errors."""
    return isinstance(error, OSError) or any(kind.__name__ == "TransportError" for kind in type(error).__mro__)


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the exported dir to repo_id (created when missing) in one commit; returns the commit's URL.
    Any failure is a HubError that says the export is complete locally and how to push it later."""

    later = f"the export in {folder} is complete locally; push it later with: hf upload {repo_id} {folder}"
    if hub_offline():
        raise HubError(f"cannot push to the hub: offline (HF_HUB_OFFLINE is set); {later}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=f"prefopt export of {folder.name}"
        )
    except LocalTokenNotFoundError:
        raise HubError(
            f"cannot push to the hub: not logged in (run `hf auth login` or set HF_TOKEN); {later}"
        ) from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        reason = (
            "the token is not valid or may not write there"
            if status in (401, 403)
            else str(error).strip().splitlines()[0]
        )
        raise HubError(f"cannot push to the hub ({repo_id}: {reason}); {later}") from None
    except Exception as error:
        if not unreachable(error):
            raise
        raise HubError(
            f"cannot push to the hub: it cannot be reached ({str(error).strip().splitlines()[0]}); {later}"
        ) from None
    return str(getattr(commit, "commit_url", None) or commit)
