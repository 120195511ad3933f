"""Procedurally generated driving scenes: the offline stand-in for Cityscapes.

A scene is a small 3D world seen by a pinhole camera 1.5 m above a flat ground plane: a road
running away to a vanishing point, sidewalks, terrain, building facades with windows, walls and
fences, trees, and objects placed on the ground (poles carrying traffic lights and signs, cars,
trucks, buses, pedestrians, riders on bicycles or motorcycles, parked bicycles). Everything is
defined in metres, so the same seed gives the same scene at any image size, and perspective comes
for free: far objects are small and close to the horizon, near ones are painted over far ones.

The classes are Cityscapes' 19 (``SYNTHETIC``); ``train`` is never drawn. Poles, traffic lights,
signs and pedestrians are frequent but thin (a few pixels at 512x256), so a 16-pixel teacher grid
misses them unless the view is zoomed -- exactly the situation Global-Local View training (GLV)
addresses. Colours are per-scene and per-object jittered, shaded and textured, and several classes
share hues (grey road / wall / building, green vegetation / terrain), so a segmenter must use shape
and context, not a colour lookup.

Rendering is numpy-vectorised per primitive (each works on its bounding box only); a 512x256 scene
takes a few milliseconds.

The package by job: ``camera`` (canvas, pinhole projection, drawing primitives), ``scene`` (ground
layout, background and objects, in metres), ``render`` (one scene from its seed, texture and
exposure), ``dataset`` (in-memory and on-disk datasets, the disk writer).
"""

from carbseg.data.synthetic.camera import CAMERA_HEIGHT
from carbseg.data.synthetic.dataset import (
    SyntheticFolder,
    SyntheticScenes,
    generate_synthetic_dataset,
    open_synthetic,
    scene_id,
)
from carbseg.data.synthetic.render import DRAWN_CLASSES, SPLITS, render_scene, scene_seed

__all__ = [
    "CAMERA_HEIGHT",
    "DRAWN_CLASSES",
    "SPLITS",
    "SyntheticFolder",
    "SyntheticScenes",
    "generate_synthetic_dataset",
    "open_synthetic",
    "render_scene",
    "scene_id",
    "scene_seed",
]
