"""The label-positions-only loss equals the stock transformers loss, value and gradients."""

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lora_manip.train.loss import IGNORE, loss_at_positions, positions_to_keep


def test_same_loss_and_gradients_as_stock_forward(tiny_model_dir):
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, 500, (2, 40))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 30:36] = ids[0, 30:36]
    labels[1, 10:14] = ids[1, 10:14]
    mask = torch.ones_like(ids)
    mask[1, 37:] = 0

    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    keep = positions_to_keep(labels)
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
    assert out.logits.shape == (2, keep.numel(), vocab) and keep.numel() < ids.shape[1] // 2
    ours = loss_at_positions(out.logits, labels, keep)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_num_items_in_batch_reduction(tiny_model_dir):
    """Gradient accumulation: each micro-batch's loss is its token sum over the token count of the whole accumulated
    batch (num_items_in_batch), as the stock forward computes it, so the micro-batches add up to the full batch's
    token mean instead of weighing a 3-token row like a 9-token one."""
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 500, (2, 24))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 5:8] = ids[0, 5:8]
    labels[1, 10:19] = ids[1, 10:19]
    n = int((labels[:, 1:] != IGNORE).sum())
    assert n == 12
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels).loss
        micro, own_means = [], []
        for i in (0, 1):
            row_ids, row_labels = ids[i:i + 1], labels[i:i + 1]
            stock = model(input_ids=row_ids, labels=row_labels, num_items_in_batch=torch.tensor(n)).loss
            keep = positions_to_keep(row_labels)
            logits = model(input_ids=row_ids, logits_to_keep=keep).logits
            ours = loss_at_positions(logits, row_labels, keep, num_items_in_batch=n)
            torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)
            micro.append(ours)
            own_means.append(loss_at_positions(logits, row_labels, keep))
    torch.testing.assert_close(sum(micro), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(micro[0] * n / 3, own_means[0])  # the same tokens, over the accumulated count
    assert not torch.isclose(sum(own_means) / 2, full)  # averaging micro-batch means is the bug this guards


def test_sample_reduction_weighs_each_sample_once():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.full((3, 6), IGNORE)
    labels[0, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # a long answer: 5 tokens
    labels[1, 5] = 7  # a one-letter answer
    # row 2: no label at all (e.g. a sample whose answer was cut): counts as no sample
    keep = positions_to_keep(labels)
    assert keep.tolist() == [0, 1, 2, 3, 4]

    def ce(row, cols):
        return torch.nn.functional.cross_entropy(logits[row, cols], labels[row, [c + 1 for c in cols]])

    long, short = ce(0, [0, 1, 2, 3, 4]), ce(1, [4])
    torch.testing.assert_close(loss_at_positions(logits, labels, keep, per_sample=True), (long + short) / 2)
    torch.testing.assert_close(loss_at_positions(logits, labels, keep), (5 * long + short) / 6)
    # gradient accumulation: two micro-batches, each divided by the 2 samples of the whole accumulated batch
    halves = [loss_at_positions(logits[i:i + 1], labels[i:i + 1], keep, num_items_in_batch=2, per_sample=True)
              for i in (0, 1)]
    torch.testing.assert_close(sum(halves), (long + short) / 2)
