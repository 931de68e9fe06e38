"""`mmehr explain`: one patient's picture. For one task sample: what the model saw (the context on a
time axis, the modality events and whether each was visible or masked at the prediction time), what it
attended to (cross-attention per block, gates, the risk with each modality knocked out), and what futures
it drew (the K rollouts over simulated time). Modules, each using those below it:

    cli          the command; patients: the report's section (a few pages per evaluation)
    page         the HTML page, explain.json, manifest
    figures      the matplotlib pictures
    collect      Explanation: everything a page shows, for one sample
    attention    cross-attention weights recomputed by forward hooks; events: a subject's modality events
    replay       which sample, and its evaluation's chunk re-run with the same samples, settings and seed
"""
