"""Ray actors: thin wrappers that build `spiral_rl` objects from config and expose a few methods.

    rollout.RolloutWorker     planner + inference copy of the world model: episodes, SDE groups, eval
    critic.CriticServer       batched scoring; critic.CriticPool load-balances and retries over M of them
    replay.ReplayStoreActor   the durable replay store, one writer
    learner.LearnerGroup      K LearnerRank actors, one DeepSpeed ZeRO engine each; weight sync to rollouts
    weight_sync               object-store / bucketed-broadcast transport and the manifest check
    cluster                   start or join Ray, the placement group

Data flows one way, launch -> actors -> spiral_rl; the library never imports this package (nor
Ray). The worker classes are plain Python: launch/grpo.py also runs them in-process
(cluster.mode=local) and wraps them with `ray.remote` for cluster.mode=ray.
"""
