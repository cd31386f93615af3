"""Input data: sources, the tf.data pipeline, image ops, tokenizers, dataset preparation."""
