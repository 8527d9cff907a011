"""Planning with the world model: physical controls and the one conversion to actions (``motion``), the sampling
optimiser (``optimizer``: CEM, MPPI), action recovery (``recovery``), the planner (``planner``) with its costs
(``costs``) and cost heads (``heads``), the ego-status baseline (``ego_mlp``) and open-loop metrics (``openloop``)."""
