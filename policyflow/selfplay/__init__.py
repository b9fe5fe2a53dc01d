"""Two policies that make their own data: R-Zero challenger/solver self-play and RLT teacher rewards (issue 20).

What tasks and workers use (layer 1): `jobs` (what a policy does with its task), `challenger`
(R-Zero's challenger task and reward), `teacher` and `rlt_reward` (RLT's). The drivers of a run
with roles (layer 2, beside `coordinator`): `driver` (roles, phases, the run folder; `METHODS`),
`rzero` and `rlt`.
"""
