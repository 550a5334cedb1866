"""The dataflow of a job: sources, decode, the model stages, the graph, the part writer."""
