# The Vagrant lab's layout, apart from the Vagrantfile so tests can read it:
#   ruby -r ./lab.rb -e 'puts CarouselLab.plan(ENV).to_json'
# Every machine gets an address in 192.168.56.0/21, the host-only range
# VirtualBox allows by default (libvirt takes it as well).
require "ipaddr"
require "json"

module CarouselLab
  NETWORK = IPAddr.new("192.168.56.0/21")
  # Host numbers within the subnet: ns1 = .11, edge1 = .21, app1 = .31.
  ROLES = [
    { prefix: "ns", env: "CAROUSEL_NS", default: 2, first_host: 11, group: "dns" },
    { prefix: "edge", env: "CAROUSEL_EDGES", default: 3, first_host: 21, group: "edge" },
    { prefix: "app", env: "CAROUSEL_APPS", default: 2, first_host: 31, group: "app" },
  ].freeze
  MAX_PER_ROLE = 9
  DEFAULTS = {
    "CAROUSEL_SUBNET" => "192.168.56",
    # Three etcd members, away from the edges so halting an edge never costs quorum.
    "CAROUSEL_ETCD" => "ns1,ns2,app1",
    # The box `make vm-box` builds from Debian packages (vagrant/box/build.sh): no box
    # registry needed. CAROUSEL_BOX=debian/bookworm64 takes the public one instead.
    "CAROUSEL_BOX" => "carousel/bookworm",
    # Pinned for the public box: a new box must not change the lab under a test. Both
    # virtualbox and libvirt builds exist for this version. The local box has none.
    "CAROUSEL_BOX_VERSION" => "12.20240905.1",
    # Where to fetch the box if the public registry cannot serve it (a mirror's
    # metadata JSON or a .box file); empty = the registry only.
    "CAROUSEL_BOX_URL" => "",
    "CAROUSEL_MEMORY" => "768",
    "CAROUSEL_CPUS" => "1",
    # Set by vagrant/vmlab.py: the lab's own libvirtd, the box's key, libvirt networks
    # with no forwarding ("isolated"), and the wheelhouse of the roles' offline mode.
    "CAROUSEL_LIBVIRT_URI" => "",
    "CAROUSEL_SSH_KEY" => "",
    "CAROUSEL_LIBVIRT_NETWORKS" => "nat",
    "CAROUSEL_OFFLINE_WHEELHOUSE" => "",
    # A tar of the ready virtualenv (built by vagrant/vmlab.py on the controller, same
    # Debian release, Python and path): unpacked on each VM instead of pip installing
    # the wheels there. Empty: pip installs them.
    "CAROUSEL_VENV_ARCHIVE" => "",
    # Seconds the daemons allow an etcd request (TLS handshake included). Empty: the
    # role's default; vagrant/vmlab.py raises it under TCG emulation.
    "CAROUSEL_ETCD_TIMEOUT" => "",
    # "1": that archive holds carousel itself too, so the roles run no pip on the VMs
    # and site.yml builds no wheel (vagrant/vmlab.py builds it on the host).
    "CAROUSEL_VENV_HAS_CAROUSEL" => "",
    # The agents' lease TTL and the health check timeout (the agents' and the edges'
    # checks of the APs) in seconds. Empty: the roles' defaults (5 and 1); vagrant/vmlab.py
    # raises both under TCG emulation, where a single etcd member let 5 s leases run out
    # between keepalives.
    "CAROUSEL_AGENT_TTL" => "",
    "CAROUSEL_CHECK_TIMEOUT" => "",
    # Seconds between health checks: the agents' of their service and the edges' of the
    # APs. Empty: the roles' defaults (1 and 2); vagrant/vmlab.py raises both under TCG,
    # where an idle daemon's checks took a share of an emulated vCPU.
    "CAROUSEL_CHECK_INTERVAL" => "",
    # etcd's Raft heartbeat in milliseconds; the election timeout is ten of them and the
    # agents' agent_etcd_election_timeout follows. Empty: the role's 100 ms.
    "CAROUSEL_ETCD_HEARTBEAT_MS" => "",
    # Seconds between the dashboard's scrapes of every admin endpoint. Empty: the role's
    # default (2); vagrant/vmlab.py raises it under TCG, where scraping every 2 s took a
    # quarter of ns1's emulated CPU (measured) and slowed every Ansible run on it.
    "CAROUSEL_DASHBOARD_INTERVAL" => "",
    # Ansible's connection and privilege-escalation timeout in seconds. Empty: the
    # Vagrant provisioner's 30 s; vagrant/vmlab.py raises it under TCG emulation, where
    # sudo on a loaded VM did not answer within 30 s (a restart handler failed on it).
    "CAROUSEL_ANSIBLE_TIMEOUT" => "",
    # Seconds Vagrant waits for a booting VM's SSH once it has an address
    # (config.vm.boot_timeout). Empty: Vagrant's 300 s; vagrant/vmlab.py raises it under
    # TCG, where edge2 booting again after a graceful halt, the host loaded, ended in
    # Vagrant's VMBootTimeout (vagrant/README.md).
    "CAROUSEL_BOOT_TIMEOUT" => "",
    # The strategy of site.yml's nodes' play. Empty: the playbook's own (free);
    # vagrant/vmlab.py passes mitogen_free when it runs Ansible with Mitogen.
    "CAROUSEL_NODES_STRATEGY" => "",
    # libvirt domain type: "kvm", or "qemu" (TCG emulation) where /dev/kvm cannot run
    # a stock Debian kernel (a PVM host; see vagrant/README.md).
    "CAROUSEL_LIBVIRT_DRIVER" => "kvm",
    # Direct kernel boot (the box's own kernel and initrd, extracted by its build):
    # set by vagrant/vmlab.py under TCG, where SeaBIOS's disk boot stalled.
    "CAROUSEL_KERNEL" => "",
    "CAROUSEL_INITRD" => "",
  }.freeze

  LOCAL_BOX = "carousel/bookworm"

  class Error < StandardError; end

  def self.setting(env, key)
    value = env[key]
    value.nil? || value.empty? ? DEFAULTS.fetch(key) : value
  end

  def self.count(env, role)
    raw = env[role[:env]]
    return role[:default] if raw.nil? || raw.empty?
    n = Integer(raw, exception: false)
    unless n && n.between?(1, MAX_PER_ROLE)
      raise Error, "#{role[:env]}=#{raw}: expected a whole number from 1 to #{MAX_PER_ROLE}"
    end
    n
  end

  # Variables for site.yml: the offline mode when the lab supplies a wheelhouse.
  def self.extra_vars(env)
    vars = {}
    wheelhouse = setting(env, "CAROUSEL_OFFLINE_WHEELHOUSE")
    unless wheelhouse.empty?
      vars.update("common_offline" => true, "common_wheelhouse" => wheelhouse, "etcd_offline" => true)
    end
    venv = setting(env, "CAROUSEL_VENV_ARCHIVE")
    vars["common_venv_archive"] = venv unless venv.empty?
    vars["common_venv_archive_has_carousel"] = true if !venv.empty? && setting(env, "CAROUSEL_VENV_HAS_CAROUSEL") == "1"
    seconds(env, "CAROUSEL_ETCD_TIMEOUT") { |s| vars["common_etcd_timeout"] = s }
    seconds(env, "CAROUSEL_AGENT_TTL") do |s|
      raise Error, "CAROUSEL_AGENT_TTL=#{s}: expected whole seconds" unless s == s.to_i
      vars["agent_ttl"] = s.to_i
    end
    # The agents' checks of their service, the edges' checks of the APs and the
    # dashboard's scrapes of the admin listeners alike.
    seconds(env, "CAROUSEL_CHECK_TIMEOUT") do |s|
      vars["agent_check_timeout"] = s
      vars["edge_pool_health_timeout"] = s
      vars["dashboard_scrape_timeout"] = s
    end
    seconds(env, "CAROUSEL_DASHBOARD_INTERVAL") { |s| vars["dashboard_scrape_interval"] = s }
    seconds(env, "CAROUSEL_CHECK_INTERVAL") do |s|
      vars["agent_check_interval"] = s
      vars["edge_pool_health_interval"] = s
    end
    seconds(env, "CAROUSEL_ETCD_HEARTBEAT_MS") do |s|
      raise Error, "CAROUSEL_ETCD_HEARTBEAT_MS=#{s}: expected whole milliseconds" unless s == s.to_i
      vars["etcd_heartbeat_interval_ms"] = s.to_i
      vars["etcd_election_timeout_ms"] = 10 * s.to_i
      vars["agent_etcd_election_timeout"] = s.to_i / 100.0
    end
    strategy = setting(env, "CAROUSEL_NODES_STRATEGY")
    vars["site_nodes_strategy"] = strategy unless strategy.empty?
    vars
  end

  # Ansible's --timeout in whole seconds, or nil for the provisioner's own (30 s).
  def self.ansible_timeout(env)
    whole_seconds(env, "CAROUSEL_ANSIBLE_TIMEOUT")
  end

  # Vagrant's boot timeout in whole seconds, or nil for Vagrant's own (300 s).
  def self.boot_timeout(env)
    whole_seconds(env, "CAROUSEL_BOOT_TIMEOUT")
  end

  # A whole number of seconds from the environment, or nil when it is not set.
  def self.whole_seconds(env, key)
    value = nil
    seconds(env, key) do |s|
      raise Error, "#{key}=#{s}: expected whole seconds" unless s == s.to_i
      value = s.to_i
    end
    value
  end

  # A positive number of seconds from the environment, given to the block when set.
  def self.seconds(env, key)
    raw = setting(env, key)
    return if raw.empty?
    value = Float(raw, exception: false)
    raise Error, "#{key}=#{raw}: expected seconds above 0" unless value&.positive?
    yield value
  end

  # The machines, their addresses and Ansible groups, from the environment.
  def self.plan(env = ENV)
    subnet = setting(env, "CAROUSEL_SUBNET")
    probe = IPAddr.new("#{subnet}.0") rescue nil
    unless probe && subnet.count(".") == 2 && NETWORK.include?(probe)
      raise Error, "CAROUSEL_SUBNET=#{subnet}: expected the first three octets of a /24 in #{NETWORK}/21"
    end
    machines = []
    ROLES.each do |role|
      count(env, role).times do |i|
        machines << {
          "name" => "#{role[:prefix]}#{i + 1}",
          "ip" => "#{subnet}.#{role[:first_host] + i}",
          "groups" => [role[:group]],
        }
      end
    end
    names = machines.map { |m| m["name"] }
    etcd = setting(env, "CAROUSEL_ETCD").split(",").map(&:strip).reject(&:empty?)
    unknown = etcd - names
    raise Error, "CAROUSEL_ETCD: no machine named #{unknown.join(', ')}" unless unknown.empty?
    unless etcd.size.odd? && etcd.uniq.size == etcd.size
      raise Error, "CAROUSEL_ETCD: an odd number of distinct members is needed, found #{etcd.join(',')}"
    end
    machines.each { |m| m["groups"] << "etcd" if etcd.include?(m["name"]) }
    groups = Hash.new { |h, k| h[k] = [] }
    machines.each { |m| m["groups"].each { |g| groups[g] << m["name"] } }
    {
      "network" => "#{NETWORK}/21",
      "machines" => machines,
      "groups" => groups.to_h,
      "box" => setting(env, "CAROUSEL_BOX"),
      "box_version" => setting(env, "CAROUSEL_BOX") == LOCAL_BOX ? "" : setting(env, "CAROUSEL_BOX_VERSION"),
      "box_url" => setting(env, "CAROUSEL_BOX_URL"),
      "memory" => Integer(setting(env, "CAROUSEL_MEMORY")),
      "cpus" => Integer(setting(env, "CAROUSEL_CPUS")),
      "libvirt_uri" => setting(env, "CAROUSEL_LIBVIRT_URI"),
      "ssh_key" => setting(env, "CAROUSEL_SSH_KEY"),
      "isolated" => setting(env, "CAROUSEL_LIBVIRT_NETWORKS") == "isolated",
      "driver" => setting(env, "CAROUSEL_LIBVIRT_DRIVER"),
      "kernel" => setting(env, "CAROUSEL_KERNEL"),
      "initrd" => setting(env, "CAROUSEL_INITRD"),
      "extra_vars" => extra_vars(env),
      "ansible_timeout" => ansible_timeout(env),
      "boot_timeout" => boot_timeout(env),
      # Relative to this directory, as Vagrant resolves the provisioner's playbook.
      "playbook" => "../deploy/ansible/site.yml",
    }
  end
end
