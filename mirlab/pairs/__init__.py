"""(image, text) pairs: the user's folders and JSONL files, mirlab's bundled samples, synthetic scenes.

    readers   Pairs, folder_pairs, jsonl_pairs, load_image, read_story, read_text
    samples   sample_photos, prose_passages, sample_pairs (bundled, offline)
    scenes    make_scene, SceneDataset, scene_dataset, caption_mentions, distractor_captions

A leaf wing: imports nothing else of mirlab except mirlab.paths and mirlab.errors.
"""
from mirlab.pairs.readers import Pairs, folder_pairs, jsonl_pairs, load_image, read_story, read_text
from mirlab.pairs.samples import photo_records, prose_passages, sample_pairs, sample_photos
from mirlab.pairs.scenes import SceneDataset, caption_mentions, distractor_captions, make_scene, scene_dataset

__all__ = ["Pairs", "SceneDataset", "caption_mentions", "distractor_captions", "folder_pairs", "jsonl_pairs",
           "load_image", "make_scene", "photo_records", "prose_passages", "read_story", "read_text",
           "sample_pairs", "sample_photos", "scene_dataset"]
