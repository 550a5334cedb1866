"""pipeline: the Ray Data streaming labelling job (sources, stages, dataset graph, outputs)."""
