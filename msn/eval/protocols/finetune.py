"""``finetune``: fine-tune the whole ViT with a new linear classifier, as transformers'
``ViTMSNForImageClassification`` (the class an export is fine-tuned with)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from msn.eval.registry import EvalTask, Results, register_protocol


def finetune_accuracy(task: EvalTask, *, epochs: int, lr: float, seed: int) -> float:
    """Fine-tune ``ViTMSNForImageClassification`` holding the task's backbone (a fresh classifier drawn from
    ``seed``) on the training split with AdamW; test accuracy in %.

    Runs on the backbone's device, under the task's autocast dtype; the encoder itself is left untouched (the
    classifier model gets a copy of its weights, through a temporary export that transformers loads).
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    from transformers import ViTMSNForImageClassification

    from msn.eval.features import TransformedImages, eval_transform
    from msn.utils.device import autocast
    from msn.utils.seeding import seeded_global_rng
    from msn.weights.export import write_hf_folder

    encoder, train, test, batch_size = task.encoder, task.train, task.test, task.batch_size
    backbone = encoder.backbone
    weights = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads its own layout: the backbone as an export
        folder = write_hf_folder(Path(tmp), weights, backbone.spec, backbone.patch_embed.patch_size[0],
                                 encoder.image_size, encoder.mean, encoder.std)
        with seeded_global_rng(seed):  # the new classifier's initial weights
            model = ViTMSNForImageClassification.from_pretrained(folder, num_labels=int(train.labels.max()) + 1)
    device = next(backbone.parameters()).device
    model.to(device)
    transform = eval_transform(encoder)
    labels = torch.from_numpy(train.labels).to(device)
    loader = DataLoader(TransformedImages(train.images, transform), batch_size=batch_size)
    images = torch.cat(list(loader)).to(device)  # small evaluation sets: keep the preprocessed images in memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="finetune", file=sys.stderr, leave=False, disable=None):  # terminal only
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            batch = batch.to(device)
            with autocast(device, task.amp_dtype):
                loss = model(pixel_values=images[batch], labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_loader = DataLoader(TransformedImages(test.images, transform), batch_size=batch_size)
    with torch.no_grad(), autocast(device, task.amp_dtype):
        predictions = torch.cat([model(pixel_values=x.to(device)).logits.argmax(1).cpu() for x in test_loader])
    return 100.0 * float((predictions.numpy() == test.labels).mean())


@register_protocol("finetune", monitor={"epochs": 5})
def finetune(task: EvalTask, *, epochs: int = 100, lr: float = 1e-3) -> Results:
    """Fine-tuning of the whole ViT and a new classifier (transformers' ViTMSNForImageClassification, AdamW,
    ``epochs`` at ``lr``), one per split (the split's seed draws the classifier). Setting: "100%"."""
    runs = (f"{task.splits} fine-tuning run{'s' if task.splits > 1 else ''}, {epochs} epochs on "
            f"{len(task.train.labels)} images")
    return {"100%": task.setting("100%", runs, lambda: [finetune_accuracy(task, epochs=epochs, lr=lr, seed=s)
                                                        for s in range(task.splits)])}
