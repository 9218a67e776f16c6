"""Fine-tuning: data, what trains, the train step, the loop and its workdir."""
