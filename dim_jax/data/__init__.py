"""Data layer: synthetic dyadic clips, the versioned TFRecord schema and the tf.data pipeline.

``records`` defines the on-disk format (writer, checks, reader, ``RecordError``), ``pipeline``
the per-host input pipeline, ``synthetic`` an embedded dataset with learnable listener
reactions. Nothing is imported here, so importing a TensorFlow-free submodule (e.g.
``dim_jax.data.official``) does not load TensorFlow.
"""
