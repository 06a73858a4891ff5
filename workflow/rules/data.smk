# Fetch (mirror / embedded copy / download, sha256-verified) and tokenize each data set once;
# every row naming the same data set shares the result. Where the verified bytes come from (the
# mirror, a data set's url, path or embedded copy) does not change the prepared data, so it is
# not a param: switching it re-runs nothing. The params are what decides the data.


rule prepare_data:
    output:
        [f"{DATA}/{name}" for name in DATA_FILES],
    wildcard_constraints:
        dataset=one_of(TEXT_DATASETS),
    params:
        content=lambda w: json.dumps(DATASETS[w.dataset].content()),
    log:
        "results/logs/prepare_{dataset}.log",
    run:
        spec = json.dumps(DATASETS[wildcards.dataset].entry())
        shell(
            "{ARCHBENCH} prepare --dataset {wildcards.dataset} --dataset-spec {spec:q} "
            "--out results/data/{wildcards.dataset} {MIRROR_ARG} 2> {log}"
        )


# A synthetic task's instances are generated from its seed and knobs (no text, no mirror); its
# directory holds the answer masks too.
rule prepare_synthetic:
    output:
        [f"{DATA}/{name}" for name in SYNTHETIC_DATA_FILES],
    wildcard_constraints:
        dataset=one_of(SYNTHETIC_DATASETS),
    params:
        spec=lambda w: json.dumps(DATASETS[w.dataset].entry()),
    log:
        "results/logs/prepare_{dataset}.log",
    shell:
        "{ARCHBENCH} prepare --dataset {wildcards.dataset} --dataset-spec {params.spec:q} "
        "--out results/data/{wildcards.dataset} 2> {log}"
