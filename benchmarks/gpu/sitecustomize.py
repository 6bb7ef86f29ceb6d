# Imported by every Python process on the GPU machine (its folder is on PYTHONPATH there): a text
# encoder unpacked by pack_text_encoder.py holds NaN in the embedding rows it did not carry; reading one
# must stop the run, not feed NaN to a model.
try:
    import torch
    from transformers.models.bert import modeling_bert

    _forward = modeling_bert.BertEmbeddings.forward

    def _checked(self, input_ids=None, *args, **kwargs):
        if input_ids is not None and torch.isnan(self.word_embeddings.weight[input_ids.reshape(-1)]).any():
            raise RuntimeError("a prompt uses a token that the packed text encoder did not carry "
                               "(benchmarks/gpu/pack_text_encoder.py)")
        return _forward(self, input_ids, *args, **kwargs)

    modeling_bert.BertEmbeddings.forward = _checked
except ImportError:
    pass
