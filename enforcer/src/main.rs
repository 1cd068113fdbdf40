fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));
    let mut ebpf = aya::Ebpf::load(obj).unwrap();
    let p: &mut aya::programs::SchedClassifier = ebpf.program_mut("from_pod").unwrap().try_into().unwrap();
    p.load().unwrap();
    println!("loaded {} bytes", obj.len());
}
