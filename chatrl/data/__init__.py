"""Data: named-dataset adapters, local files, per-step split/blend, tokenize + cache, collators,
and the built-in demo task with its judge."""

from .adapters import ADAPTERS, adapt_rows
from .collate import batches, collate_pairs, collate_prompts, collate_sft, epoch_order, shard
from .demo import demo_dataset, demo_topic, held_out_prompts, judge
from .sources import FEATURES, SourceData, load_source, rows_to_dataset
from .split import StepData, build_step_data, parse_data_split
from .tokenize import tokenize_step_data

__all__ = ["ADAPTERS", "FEATURES", "SourceData", "StepData", "adapt_rows", "batches", "build_step_data",
           "collate_pairs", "collate_prompts", "collate_sft", "demo_dataset", "demo_topic",
           "epoch_order", "held_out_prompts", "judge", "load_source", "parse_data_split",
           "rows_to_dataset", "shard", "tokenize_step_data"]
