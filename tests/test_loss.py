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
    logits = torch.randn(1, 3, 7)
    labels = torch.tensor([[IGNORE, 1, 2, 3]])
    keep = positions_to_keep(labels)
    assert keep.tolist() == [0, 1, 2]
    mean = loss_at_positions(logits, labels, keep)
    summed_over_6 = loss_at_positions(logits, labels, keep, num_items_in_batch=6)
    torch.testing.assert_close(summed_over_6 * 2, mean)


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
