# Fetch (mirror / embedded copy / download, sha256-verified) and tokenize each data set once;
# every row naming the same data set shares the result.


rule prepare_data:
    output:
        [f"{DATA}/{name}" for name in DATA_FILES],
    params:
        spec=lambda w: json.dumps({k: v for k, v in vars(DATASETS[w.dataset]).items() if k != "name"}),
        mirror=f"--mirror {MIRROR}" if MIRROR else "",
    log:
        "results/logs/prepare_{dataset}.log",
    shell:
        "{ARCHBENCH} prepare --dataset {wildcards.dataset} --dataset-spec {params.spec:q} "
        "--out results/data/{wildcards.dataset} {params.mirror} 2> {log}"
