"""carbseg: weakly supervised semantic segmentation for driving scenes.

Data flow (one module per stage):

    images + GT masks --labels--> image-level labels --teacher--> pseudo-masks (offline)
    or teacher-in-the-loop (online) --views--> global crop + local patch --segmenter-->
    logits --CARB loss--> training --inference--> predictions --metrics--> mIoU report.
"""

__version__ = "0.1.0"
