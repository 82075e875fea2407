"""What the services share, in two layers: `shared.platform` (how a service runs, talks and stores)
and `shared.domain` (the contracts and operations of fine-tuning that several services perform).
See the README.md of each."""
