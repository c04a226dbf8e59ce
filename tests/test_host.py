"""fusiontree.host: the CPUs a process may use, under a container's CPU quota too."""

import os

from fusiontree.host import cgroup_cpu_quota, cpu_count


def test_cpu_quota_of_cgroup_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("1550000 100000\n")  # 15.5 CPUs' worth: 16
    assert cgroup_cpu_quota(v2) == 16
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 2
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_cpu_count_takes_the_smaller_of_affinity_and_quota(tmp_path):
    mask = len(os.sched_getaffinity(0))
    assert cpu_count(tmp_path) == mask  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cpu_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(mask + 4) * 100000} 100000\n")
    assert cpu_count(tmp_path) == mask  # a quota above the mask does not add CPUs
