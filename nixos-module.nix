# services.runtimeModules: NixOS modules switched on and off at runtime, by hand or by rules.
#
# The base system carries the registry (/etc/runtime-modules/modules.json), the rules, the hooks,
# the udev rules and the daemon; `runtime-modules enable NAME` (or a rule) makes a flake that
# extends this very system with the module's imports and switches to it with `nixos-rebuild test`.
# See docs/nixos.md.
#
# One promise shapes this file: everything it generates is identical in the base system and in
# every extended system, so switching into an extended system never changes the registry, the
# rules, the hooks, the udev rules or the unit, and never restarts the daemon that is switching.
# How: each module's import list (internal.moduleImports, what the generated flake passes to
# extendModules) ends with `baseMarker`, which hands the base system's generated values to the
# extended evaluation (internal.base). An extended system uses them as they are instead of
# computing its own, so even a module that changes nixpkgs (an overlay, nixpkgs.config) cannot
# rebuild our package, our files or our unit differently.
{
  config,
  options,
  lib,
  pkgs,
  extendModules,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkOption
    mkIf
    mkMerge
    types
    literalExpression
    getExe
    optional
    optionals
    optionalAttrs
    optionalString
    concatMapStrings
    concatStringsSep
    filter
    filterAttrs
    mapAttrs
    mapAttrs'
    nameValuePair
    listToAttrs
    attrNames
    attrByPath
    imap1
    fixedWidthNumber
    hasSuffix
    escapeShellArg
    unique
    ;

  cfg = config.services.runtimeModules;
  opt = "services.runtimeModules";

  # --- Option types --------------------------------------------------------------------------

  moduleType = types.submodule (
    { config, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          example = "gaming";
          description = ''
            The module's name, as `runtime-modules enable NAME` and rules use it: letters, digits
            and `_ . + -`, at most 128 characters.
          '';
        };
        imports = mkOption {
          type = types.listOf types.raw;
          default = [ ];
          example = literalExpression "[ ./gaming.nix inputs.nix-gaming.nixosModules.pipewireLowLatency ]";
          description = ''
            NixOS modules that make up this runtime module. Enabling it extends the base system
            with them (`extendModules`); the base system does not import them.
          '';
        };
        desc = mkOption {
          type = types.str;
          default = "";
          example = "Steam and friends";
          description = "A short description, shown by `runtime-modules list`.";
        };
        skipValidation = mkOption {
          type = types.bool;
          default = false;
          description = ''
            Do not evaluate this module on top of the base system at build time (see
            {option}`services.runtimeModules.validateModules`). Its kernel-level changes are then
            unknown too.
          '';
        };
        path = mkOption {
          type = types.nullOr types.path;
          default = null;
          visible = false;
          description = "Deprecated: use `imports = [ path ]`.";
        };
      };
      # The reference design's `path` lives on as one more import.
      config.imports = mkIf (config.path != null) [ config.path ];
    }
  );

  # A rule is an attribute set with exactly the structure of one TOML [[rule]] (docs: rules/).
  # Known keys are typed for early, precise NixOS errors; any other key is passed through so that
  # `runtime-modules rules check` reports it at build time with a "did you mean" hint.
  ruleType = types.submodule {
    freeformType = types.attrsOf types.anything;
    options = {
      name = mkOption {
        type = types.str;
        description = "The rule's name, unique across all rules.";
      };
      modules = mkOption {
        type = types.nonEmptyListOf types.str;
        description = "The runtime modules this rule wants while its condition holds.";
      };
      description = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "What the rule is for, shown by `runtime-modules explain`.";
      };
      settle = mkOption {
        type = types.nullOr (types.either types.str types.number);
        default = null;
        example = "3s";
        description = ''
          How long the condition must hold before the rule counts: `"500ms"`, `"3s"`, `"2m"` or
          seconds. Default: {option}`services.runtimeModules.settle`.
        '';
      };
      linger = mkOption {
        type = types.nullOr (types.either types.str types.number);
        default = null;
        example = "30s";
        description = ''
          How long the rule keeps counting after the condition stops. Default:
          {option}`services.runtimeModules.linger`.
        '';
      };
      enabled = mkOption {
        type = types.nullOr types.bool;
        default = null;
        description = "Set to `false` to keep a rule without it acting.";
      };
      when = mkOption {
        type = types.attrsOf types.anything;
        example = literalExpression ''
          {
            device = {
              subsystem = "pci";
              properties.RUNTIME_MODULES_GPU_VENDOR = "nvidia";
            };
          }
        '';
        description = ''
          The condition: `device` (a udev device, with `subsystem`, `properties`, `parent`, ...),
          `link` (a network link), or `all`/`any`/`not` of conditions. The udev rules installed
          by this module classify devices into `RUNTIME_MODULES_*` properties (docs/nixos.md).
        '';
      };
    };
  };

  # Script text (run by bash) or a path to an executable (see isHookPath).
  hookType = types.either types.path types.lines;

  # A path literal, a derivation, or a string that is one absolute path with no whitespace
  # ("${pkg}/bin/x", "/run/current-system/sw/bin/x"). types.path alone would also take
  # "/usr/bin/systemctl try-restart nginx.service" and make it a dangling symlink in /etc.
  isHookPath =
    value:
    builtins.isPath value
    || lib.isDerivation value
    || (builtins.isString value && builtins.match "/[^[:space:]]*" value != null);

  hooksOption =
    phase: when:
    mkOption {
      type = types.attrsOf hookType;
      default = { };
      example = literalExpression ''
        {
          "50-notify" = "''${config.services.runtimeModules.package}/share/runtime-modules/hooks/notify-users";
          "60-restart-vpn" = '''
            case " $RUNTIME_MODULES_AFTER " in *" lab "*) systemctl try-restart wg-quick-lab.service ;; esac
          ''';
        }
      '';
      description = ''
        Hooks run ${when}, in name order, as
        {file}`/etc/runtime-modules/hooks/${phase}.d/<name>`: script text (run by bash) or a path
        to an executable (a path; a package, whose `meta.mainProgram` is linked, as `lib.getExe`
        finds it; or a string that is one absolute path without whitespace: a command line with
        arguments is script text). They get `RUNTIME_MODULES_BEFORE`, `RUNTIME_MODULES_AFTER`,
        `RUNTIME_MODULES_REASON` (and `RUNTIME_MODULES_RESULT` after an apply) in the environment
        and the whole apply as JSON on stdin; see hooks/README.md.${optionalString (phase == "pre-apply") " A hook that exits non-zero vetoes the apply."}
      '';
    };

  # `self` of a flake, or anything else with an outPath (and ideally a narHash).
  flakeType = types.addCheck types.raw (x: builtins.isAttrs x && x ? outPath) // {
    description = "flake (an attribute set with outPath, such as `self`)";
  };

  # --- The modules ----------------------------------------------------------------------------

  builtinModules = mapAttrs' (
    name: m:
    nameValuePair "rt.${name}" {
      name = "rt.${name}";
      inherit (m) desc imports;
      skipValidation = false;
      path = null;
    }
  ) (import ./nix/modules);

  allModules =
    map (m: {
      inherit (m)
        name
        desc
        imports
        skipValidation
        path
        ;
    }) cfg.modules
    ++ optionals cfg.builtinModules.enable (builtins.attrValues builtinModules);

  checkedModules = filter (m: !m.skipValidation) allModules;

  # Hands the base system's generated values to an extended evaluation (see the top of this
  # file). The key makes the module system import it once however many modules are enabled.
  baseMarker = {
    key = "runtime-modules#base";
    _file = "services.runtimeModules (the base system's generated values)";
    config.services.runtimeModules.internal.base = own;
  };

  moduleImports = listToAttrs (map (m: nameValuePair m.name (m.imports ++ [ baseMarker ])) allModules);

  # The base extended with one module: exactly what the generated flake builds when only that
  # module is enabled. Bound once per module, so validation and kernel-change detection share it.
  extended = mapAttrs (_: imports: extendModules { modules = imports; }) moduleImports;

  # --- Kernel-level changes -------------------------------------------------------------------

  # Options whose changes `nixos-rebuild test` cannot apply to the running kernel and initrd
  # (docs/nixos.md, "Kernel-level changes"), with where their value is read.
  kernelLevelOptions = {
    "boot.kernelPackages" = [ "boot" "kernelPackages" "kernel" ];
    "boot.kernelParams" = [ "boot" "kernelParams" ];
    "boot.kernelModules" = [ "boot" "kernelModules" ];
    "boot.extraModulePackages" = [ "boot" "extraModulePackages" ];
    "boot.blacklistedKernelModules" = [ "boot" "blacklistedKernelModules" ];
    "boot.extraModprobeConfig" = [ "boot" "extraModprobeConfig" ];
    "boot.initrd" = [ "system" "build" "initialRamdisk" ];
  };

  # A comparable fingerprint: JSON with derivations as their store paths. Reading a derivation's
  # outPath evaluates it (not builds it); that is the cost docs/nixos.md states. A list counts
  # as a set: NixOS merges these lists by concatenation, so a module that adds a kernel module
  # the base already loads (or a parameter it already has) repeats it without changing anything.
  normalise =
    v: if builtins.isList v then builtins.sort builtins.lessThan (unique (map builtins.toJSON v)) else v;
  fingerprint =
    c: path:
    let
      r = builtins.tryEval (builtins.toJSON (normalise (attrByPath path null c)));
    in
    if r.success then builtins.unsafeDiscardStringContext r.value else "<error>";

  kernelChanges =
    name:
    filter (
      option:
      fingerprint config kernelLevelOptions.${option}
      != fingerprint extended.${name}.config kernelLevelOptions.${option}
    ) (attrNames kernelLevelOptions);

  # --- Generated files ------------------------------------------------------------------------

  # A flake in a subdirectory of its repository (`?dir=nixos`): newer Nix gives `self` the
  # subdirectory as outPath but the root's sourceInfo and narHash, so the reference is the root
  # with `dir`. Nix 2.8 gives the root as outPath and no way to find the subdirectory; the
  # assertion on flake.nix below catches that.
  flakeRoot = toString (cfg.flake.sourceInfo.outPath or cfg.flake.outPath);
  flakeSubdir =
    let
      out = toString cfg.flake.outPath;
    in
    if lib.hasPrefix "${flakeRoot}/" out then lib.removePrefix "${flakeRoot}/" out else null;

  flakeRef =
    if cfg.flake != null then
      let
        query =
          optional (flakeSubdir != null) "dir=${flakeSubdir}"
          ++ optional (cfg.flake ? narHash) "narHash=${cfg.flake.narHash}";
      in
      "path:${if flakeSubdir != null then flakeRoot else cfg.flake.outPath}"
      + optionalString (query != [ ]) "?${concatStringsSep "&" query}"
    else
      cfg.flakeUrl;

  # The base flake and every input of it, inputs of inputs included. The registry's reference
  # keeps only the flake's own source alive; without the inputs (nixpkgs above all) in this
  # system's closure, `nix-collect-garbage` would make the next `enable` fetch them again, or
  # fail offline. The key dedupes inputs shared through `follows`.
  flakeSources = map (x: x.flake.sourceInfo.outPath or x.flake.outPath) (
    builtins.genericClosure {
      startSet = [
        {
          key = toString cfg.flake.outPath;
          inherit (cfg) flake;
        }
      ];
      operator =
        item:
        map (input: {
          key = toString input.outPath;
          flake = input;
        }) (builtins.attrValues (item.flake.inputs or { }));
    }
  );

  # The contract with runtime_modules/_registry.py. kernel_changes is left out (unknown) for
  # modules that are not evaluated at build time.
  registry = {
    host = cfg.hostName;
    flake = flakeRef;
    modules = map (
      m:
      {
        inherit (m) name;
        description = m.desc;
      }
      // optionalAttrs (cfg.detectKernelChanges && !m.skipValidation) {
        kernel_changes = kernelChanges m.name;
      }
    ) allModules;
  };

  registryFile = pkgs.writeText "runtime-modules-registry.json" (builtins.toJSON registry);

  ruleJSON = rule: filterAttrs (_: v: v != null) rule;

  rulesFromOptions = pkgs.writeText "runtime-modules-rules.json" (
    builtins.toJSON { rule = map ruleJSON cfg.rules; }
  );

  # "01-gaming.toml": numbered so that two files with the same name cannot collide.
  ruleFileEntries = imap1 (i: file: {
    name = "${fixedWidthNumber 2 i}-${baseNameOf (toString file)}";
    inherit file;
  }) cfg.ruleFiles;

  hasRules = cfg.rules != [ ] || cfg.ruleFiles != [ ];

  # The folder the daemon reads: the rules above as one JSON file, then the rule files.
  rulesDir =
    pkgs.runCommand "runtime-modules-rules"
      { fromOptions = if cfg.rules != [ ] then rulesFromOptions else null; }
      ''
        mkdir -p $out
        if [ -n "$fromOptions" ]; then ln -s "$fromOptions" $out/00-services.runtimeModules.rules.json; fi
        ${concatMapStrings (e: "ln -s ${e.file} $out/${escapeShellArg e.name}\n") ruleFileEntries}
      '';

  # Like alertmanager's checkConfig: a bad rule fails nixos-rebuild, not the running daemon.
  checkedRulesDir =
    if cfg.checkRules && hasRules then
      pkgs.runCommand "runtime-modules-rules-checked"
        {
          nativeBuildInputs = [ cfg.package ];
          rules = rulesDir;
          registry = registryFile;
        }
        ''
          runtime-modules rules check --registry "$registry" "$rules"
          ln -s "$rules" $out
        ''
    else
      rulesDir;

  # A package is a folder: its executable is the hook (lib.getExe: meta.mainProgram, else
  # bin/<name> with nixpkgs' warning). A script from writeScript/writeShellScript is itself a file
  # (executable, and no mainProgram since it has no bin/).
  hookExe = drv: if !(drv ? meta.mainProgram) && (drv.executable or false) == true then drv else getExe drv;

  hookFile =
    phase: name: value:
    if lib.isDerivation value then
      hookExe value
    else if isHookPath value then
      value
    else
      pkgs.writeShellScript "runtime-modules-${phase}-${lib.strings.sanitizeDerivationName name}" value;

  hookEtc =
    phase: hooks:
    mapAttrs' (
      name: value:
      nameValuePair "runtime-modules/hooks/${phase}.d/${name}" { source = hookFile phase name value; }
    ) hooks;

  udevRules = pkgs.writeTextFile {
    name = "runtime-modules-udev-rules";
    destination = "/lib/udev/rules.d/90-runtime-modules.rules";
    text = builtins.readFile ./udev/90-runtime-modules.rules;
  };

  # "0.5", "30": what Python's float() reads (toString would give "0.500000").
  seconds = builtins.toJSON;

  # systemd/runtime-modules.service for NixOS; tests/test_systemd_unit.py compares the two.
  service = {
    description = "runtime-modules: switch NixOS runtime modules by rules";
    wantedBy = [ "multi-user.target" ];
    after = [
      "systemd-udevd.service"
      "nix-daemon.socket"
      "network-pre.target"
    ];
    wants = [ "nix-daemon.socket" ];

    # Applies run `nixos-rebuild test` from inside this unit. If switch-to-configuration restarted
    # the unit, it would kill the apply it is part of, and the rollback with it. An extended
    # system never changes this unit (see the top of this file); this is the belt to those
    # braces, for what NixOS adds to every unit (LOCALE_ARCHIVE, the default PATH) and a module
    # could change. When the unit does change (a new base system), switch-to-configuration
    # reloads it (SIGHUP: the daemon reads the registry and rules again) instead of restarting
    # it; a new package, log level or settle/linger default takes effect at the next
    # `systemctl restart runtime-modules` (docs/nixos.md). restartIfChanged only matters should
    # reloadIfChanged be forced off: then a change is skipped, never a restart.
    reloadIfChanged = true;
    restartIfChanged = false;
    # The unit names /etc paths only; these make it change (and so reload) when what they point
    # to changes. Hooks need nothing: they are looked up at each apply. restartTriggers, not
    # reloadTriggers: with reloadIfChanged any change already means a reload, and NixOS warns
    # on every build about a unit with both.
    restartTriggers = [
      registryFile
      checkedRulesDir
    ];

    # nixos-rebuild and Nix of the base system; then whatever the running system offers, for
    # hooks (notify-send, systemctl, ...). The last entry is resolved at run time, so the unit
    # does not change when a module adds a program.
    path = [
      config.system.build.nixos-rebuild
      config.nix.package
      pkgs.gitMinimal
      "/run/current-system/sw"
    ];

    environment = {
      RUNTIME_MODULES_REGISTRY = "/etc/runtime-modules/modules.json";
      RUNTIME_MODULES_STATE_DIR = "/run/runtime-modules";
      RUNTIME_MODULES_RULES = "/etc/runtime-modules/rules";
      RUNTIME_MODULES_HOOKS_DIR = "/etc/runtime-modules/hooks";
      RUNTIME_MODULES_CONTROL_GROUP = if cfg.controlGroup == null then "" else cfg.controlGroup;
      RUNTIME_MODULES_LOG_LEVEL = cfg.logLevel;
      RUNTIME_MODULES_SETTLE = seconds cfg.settle;
      RUNTIME_MODULES_LINGER = seconds cfg.linger;
      RUNTIME_MODULES_APPLY_TIMEOUT = seconds cfg.applyTimeout;
      RUNTIME_MODULES_HOOK_TIMEOUT = seconds cfg.hooks.timeout;
      # Builds go through nix-daemon, which sandboxes them with its own namespaces; that is what
      # lets RestrictNamespaces below hold for this unit.
      NIX_REMOTE = "daemon";
    };

    unitConfig = {
      StartLimitIntervalSec = 300;
      StartLimitBurst = 5;
    };

    serviceConfig = {
      Type = "notify";
      # Only the daemon may report READY=1/WATCHDOG=1, not nixos-rebuild or a hook.
      NotifyAccess = "main";
      ExecStart = "${getExe cfg.package} watch";
      # SIGHUP: read the registry and the rules again; an apply in flight goes on.
      ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
      Restart = "on-failure";
      RestartSec = "5s";
      # Pinged every WatchdogSec/2 from the event loop, which an apply never blocks.
      WatchdogSec = "60s";
      # Before READY=1 the daemon finishes an apply a killed daemon left half-done: it may wait
      # for the apply lock (held by a `runtime-modules enable` run by hand: up to applyTimeout
      # plus its activation), then run a rollback activation. systemd's 90 s default would fail
      # the start, and kill that rollback, in the middle of it. applyTimeout + 15 min (45 min).
      TimeoutStartSec = "${toString ((cfg.applyTimeout + 59) / 60 + 15)}min";
      # On SIGTERM the daemon lets an apply finish for 30 s, then cancels it: a build still
      # running is killed and the running system left untouched (result "cancelled"); an
      # activation already running is never killed, it is waited for (and rolled back if it
      # fails). Each switch-to-configuration waits up to DefaultTimeoutStopSec (90 s) per unit
      # it stops.
      TimeoutStopSec = "10min";
      # SIGTERM to the daemon alone, so it can kill the build itself and wait for an activation
      # or rollback in flight (which systemd would otherwise kill too); SIGKILL to all after
      # TimeoutStopSec.
      KillMode = "mixed";

      # State, lock, control socket and generated flake; kept when the daemon stops, because the
      # CLI applies without it (tmpfiles below creates it at boot either way).
      RuntimeDirectory = "runtime-modules";
      RuntimeDirectoryMode = "0755";
      RuntimeDirectoryPreserve = true;
      # Overrides made with --persist.
      StateDirectory = "runtime-modules";
      StateDirectoryMode = "0755";
      # State files are read by unprivileged `runtime-modules status`.
      UMask = "0022";

      # Hardening. The daemon is root by design and runs activation (switch-to-configuration)
      # in its own process tree when it rolls back; see the end of this list for what is left
      # out and why. Start: alertmanager's list.
      # netlink for pyudev and pyroute2; AF_UNIX for journald, D-Bus, nix-daemon and the control
      # socket; IP for a remote base flake (flakeUrl = "github:...").
      RestrictAddressFamilies = [
        "AF_UNIX"
        "AF_NETLINK"
        "AF_INET"
        "AF_INET6"
      ];
      RestrictNamespaces = true;
      RestrictRealtime = true;
      LockPersonality = true;
      NoNewPrivileges = true;
      SystemCallArchitectures = "native";
      # A deny-list: activation scripts and hooks run arbitrary programs, and one refused system
      # call would leave a half-switched system (and break the rollback too).
      SystemCallFilter = [ "~@clock @cpu-emulation @debug @obsolete @raw-io @reboot @swap" ];
      SystemCallErrorNumber = "EPERM";
      # Never reboot, kexec or set the clock.
      CapabilityBoundingSet = [ "~CAP_SYS_BOOT CAP_SYS_TIME CAP_WAKE_ALARM" ];

      # Left out on purpose:
      # - everything that gives the unit its own mount namespace (ProtectSystem, ProtectHome,
      #   PrivateTmp, PrivateDevices, ProtectKernelTunables, ProtectKernelModules,
      #   ProtectKernelLogs, ProtectControlGroups, ProtectProc, ReadOnlyPaths, ...): activation
      #   writes /etc, /var, home directories, /proc/sys/kernel/modprobe and the firmware path in
      #   /sys, and its mounts (/run/wrappers, /run/keys) must land in the host's namespace;
      # - ProtectHostname: activation sets the hostname;
      # - ProtectClock, DevicePolicy, DeviceAllow: a device allow-list that activation scripts
      #   and hooks may trip over (the clock system calls are denied above);
      # - RestrictSUIDSGID: activation creates the setuid wrappers;
      # - MemoryDenyWriteExecute: hooks and activation scripts may run JIT-compiling programs;
      # - PrivateNetwork, PrivateUsers, DynamicUser, User: it watches the host's links, as root;
      # - CapabilityBoundingSet keeps CAP_SYS_MODULE: a hook may load a kernel module.
    };
  };

  # Everything this module generates. An extended system takes the base's (internal.base).
  own = {
    package = cfg.package;
    etc = {
      "runtime-modules/modules.json".source = registryFile;
      "runtime-modules/rules".source = checkedRulesDir;
    }
    // hookEtc "pre-apply" cfg.hooks.preApply
    // hookEtc "post-apply" cfg.hooks.postApply;
    inherit udevRules service;
  };

  # Only an extended system defines internal.base (through baseMarker).
  isBase = !options.services.runtimeModules.internal.base.isDefined;

  generated = if isBase then own else cfg.internal.base;

  # --- Checks ---------------------------------------------------------------------------------

  # The registry's patterns (runtime_modules/_registry.py): what the CLI would refuse to read.
  validModuleName = n: builtins.match "[A-Za-z0-9_][A-Za-z0-9_.+-]*" n != null && builtins.stringLength n <= 128;
  validHostName = n: builtins.match "[A-Za-z0-9_][A-Za-z0-9_.-]*" n != null && builtins.stringLength n <= 253;
  validFlakeRef = r: builtins.match "[A-Za-z0-9+.:/_?=&%@~,#-]+" r != null && builtins.stringLength r <= 4096;
  # What the hook runner will run: no path separator, not hidden, not an editor backup.
  validHookName = n: builtins.match "[A-Za-z0-9_][A-Za-z0-9_.+-]*" n != null && !(hasSuffix "~" n);

  # Locked: a commit (`rev=`, or github:/gitlab:/sourcehut: with a full commit hash as the ref)
  # or a content hash (`narHash=`). Anything else is resolved again whenever the daemon locks it.
  lockedFlakeRef =
    r:
    builtins.match ".*[?&](rev|narHash)=.*" r != null
    || builtins.match "(github|gitlab|sourcehut):[^/?]+/[^/?]+/[0-9a-f]{40}([?#].*)?" r != null;

  moduleNames = map (m: m.name) allModules;
  duplicateNames = unique (filter (n: builtins.length (filter (x: x == n) moduleNames) > 1) moduleNames);

  assertions =
    [
      {
        assertion = (cfg.flake != null) != (cfg.flakeUrl != null);
        message = ''
          ${opt}: set exactly one of ${opt}.flake (the flake that builds this system, usually
          `self`: pinned and offline) and ${opt}.flakeUrl (a flake reference such as
          "github:you/nixos-config").
        '';
      }
      {
        assertion = cfg.flake == null || builtins.pathExists "${cfg.flake.outPath}/flake.nix";
        message = ''
          ${opt}.flake: ${toString (cfg.flake.outPath or "")} has no flake.nix, so runtime modules could
          not extend this system from it. This happens when the flake lives in a subdirectory of
          its repository (`?dir=...`) and this Nix version gives `self` the repository's root.
          Set ${opt}.flake = null and ${opt}.flakeUrl to a locked reference instead, e.g.
          "git+file:///etc/nixos-repo?dir=nixos&rev=<commit>".
        '';
      }
      {
        assertion = cfg.flakeUrl == null || validFlakeRef cfg.flakeUrl;
        message = ''
          ${opt}.flakeUrl = ${builtins.toJSON cfg.flakeUrl} is not a flake reference runtime-modules
          can use: only letters, digits and + . : / _ ? = & % @ ~ , # - are allowed (no quotes,
          backslashes, "$" or spaces).
        '';
      }
      {
        assertion = validHostName cfg.hostName;
        message = ''
          ${opt}.hostName = ${builtins.toJSON cfg.hostName} is not a nixosConfigurations name:
          set it to the attribute that builds this system (nixosConfigurations.<name>); letters,
          digits and _ . - only.
        '';
      }
      {
        assertion = duplicateNames == [ ];
        message = "${opt}.modules: the module name(s) ${concatStringsSep ", " duplicateNames} are used more than once; rename all but one.";
      }
    ]
    ++ map (m: {
      assertion = validModuleName m.name;
      message = ''
        ${opt}.modules: the name ${builtins.toJSON m.name} is not a module name: use 1-128 of
        letters, digits and _ . + - (not starting with . + -).
      '';
    }) allModules
    ++ map (name: {
      assertion = validHookName name;
      message = ''
        ${opt}.hooks: the hook name ${builtins.toJSON name} cannot be a file name in a hooks
        folder: use letters, digits and _ . + - (not starting with . + - or ending with ~).
      '';
    }) (attrNames cfg.hooks.preApply ++ attrNames cfg.hooks.postApply)
    ++ map (e: {
      assertion = hasSuffix ".toml" e.name || hasSuffix ".json" e.name;
      message = "${opt}.ruleFiles: ${toString e.file} is neither .toml nor .json; the daemon reads only those.";
    }) ruleFileEntries
    ++ optional (cfg.controlGroup != null) {
      assertion = builtins.match "[a-z_][a-z0-9_-]*[$]?" cfg.controlGroup != null;
      message = "${opt}.controlGroup = ${builtins.toJSON cfg.controlGroup} is not a group name.";
    }
    # Evaluate each module on top of this system now, so a module that cannot work fails this
    # build rather than a later `runtime-modules enable`. Only in the base: an extended system's
    # modules were checked when its base was built.
    ++ optionals (isBase && cfg.validateModules) (map validation checkedModules);

  # The extended system's own failed assertions are reported with the module's name; any other
  # evaluation error (an unfree package, a misspelt option) stops the build with its own message,
  # and `--show-trace` names the module.
  validation =
    m:
    let
      failed = filter (a: !a.assertion) extended.${m.name}.config.assertions;
    in
    if failed != [ ] then
      {
        assertion = false;
        message = ''
          ${opt}: the runtime module ${m.name} cannot be enabled on this system (checked because
          ${opt}.validateModules is on; set skipValidation = true on the module to skip it):
          ${concatMapStrings (a: "  - ${a.message}\n") failed}'';
      }
    else
      {
        assertion = builtins.addErrorContext "while evaluating the runtime module ${m.name} on top of this system (${opt}.validateModules; set skipValidation = true on the module to skip it)" (
          builtins.seq extended.${m.name}.config.system.build.toplevel.drvPath true
        );
        message = "${opt}: the runtime module ${m.name} does not evaluate on top of this system.";
      };
in
{
  options.services.runtimeModules = {
    enable = mkEnableOption "runtime modules: NixOS modules switched on and off at runtime, by hand or by rules";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage \"\${runtime-modules}/nix/package.nix\" { }";
      description = ''
        The runtime-modules package (this flake's `packages.default`, built with this system's
        nixpkgs).
      '';
    };

    flake = mkOption {
      type = types.nullOr flakeType;
      default = null;
      example = literalExpression "self";
      description = ''
        The flake that builds this system, normally `self` of your configuration flake. Runtime
        modules then extend exactly the source this system was built from
        (`path:/nix/store/...-source?narHash=...`), offline, and enabling a module never changes
        the base system. Set this or {option}`services.runtimeModules.flakeUrl`.
      '';
    };

    flakeUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "github:alice/nixos-config";
      description = ''
        A flake reference to the base system's flake, for when `self` is not at hand. Give a
        locked one (`?rev=<commit>` or `?narHash=...`): an unlocked one is locked at the first
        apply and kept until reboot, so an extended system may be built on another revision
        than this system (a warning says so). Prefer {option}`services.runtimeModules.flake`,
        which is pinned to the exact source of this system.
      '';
    };

    hostName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      description = "The name of this system in the flake's `nixosConfigurations`.";
    };

    modules = mkOption {
      type = types.listOf moduleType;
      default = [ ];
      example = literalExpression ''
        [
          { name = "gaming"; desc = "Steam and friends"; imports = [ ./gaming.nix ]; }
          { name = "lab"; imports = [ ./lab-vpn.nix ./lab-tools.nix ]; }
        ]
      '';
      description = "The runtime modules: NixOS modules that can be switched on and off at runtime.";
    };

    builtinModules.enable = mkEnableOption ''
      the built-in runtime modules `rt.gaming`, `rt.virtualization` and `rt.podman` (nix/modules
      in this repository)
    '';

    validateModules = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Evaluate every runtime module on top of this system when this system is built, so that a
        module that cannot work fails `nixos-rebuild` instead of a later
        `runtime-modules enable`. This costs one more NixOS evaluation per module (seconds and
        hundreds of MB each); turn it off, or set `skipValidation` on single modules, when that
        is too much.
      '';
    };

    detectKernelChanges = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Find, at build time, which kernel-level options each runtime module changes
        (`boot.kernelPackages`, `boot.kernelParams`, `boot.kernelModules`,
        `boot.extraModulePackages`, `boot.blacklistedKernelModules`,
        `boot.extraModprobeConfig`, the initrd). `nixos-rebuild test` cannot apply those to the
        running kernel, and `runtime-modules status` warns about them. Each module is evaluated
        on top of this system as far as these options need (the kernel and initrd derivations
        included), which is nearly free when {option}`services.runtimeModules.validateModules`
        is on.
      '';
    };

    rules = mkOption {
      type = types.listOf ruleType;
      default = [ ];
      example = literalExpression ''
        [
          {
            name = "gaming-on-nvidia-gpu";
            modules = [ "rt.gaming" ];
            when.device.properties.RUNTIME_MODULES_GPU_VENDOR = "nvidia";
          }
          {
            name = "virtualization-when-docked";
            modules = [ "rt.virtualization" ];
            linger = "2m";
            when.any = [
              { device.properties.RUNTIME_MODULES_CLASS = "thunderbolt-peripheral"; }
              { device.properties = { RUNTIME_MODULES_CLASS = "net"; RUNTIME_MODULES_NET_BUS = "usb"; }; }
            ];
          }
        ]
      '';
      description = ''
        Rules that map udev devices and network links to runtime modules, each an attribute set
        with exactly the structure of a `[[rule]]` table of a rules file (rules/ in this
        repository). They are written as JSON to {file}`/etc/runtime-modules/rules/` and checked
        at build time (see {option}`services.runtimeModules.checkRules`).
      '';
    };

    ruleFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = literalExpression "[ ./rules/gaming.toml ]";
      description = "Rule files (TOML or JSON) to install in {file}`/etc/runtime-modules/rules/` next to the rules above.";
    };

    checkRules = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Check the rules with `runtime-modules rules check` while building the system, against
        this system's modules, so that a bad rule fails `nixos-rebuild`, not the running daemon.
        The check runs in the Nix build sandbox.
      '';
    };

    settle = mkOption {
      type = types.numbers.nonnegative;
      default = 3;
      description = "Seconds a rule's condition must hold before it counts, for rules that give no `settle`.";
    };

    linger = mkOption {
      type = types.numbers.nonnegative;
      default = 30;
      description = "Seconds a rule keeps counting after its condition stops, for rules that give no `linger`.";
    };

    watch.enable = mkOption {
      type = types.bool;
      default = cfg.rules != [ ] || cfg.ruleFiles != [ ];
      defaultText = literalExpression "config.services.runtimeModules.rules != [ ] || config.services.runtimeModules.ruleFiles != [ ]";
      description = ''
        Run the daemon (`runtime-modules watch`, unit `runtime-modules.service`), which follows
        udev and netlink and applies what the rules want. Without it, modules change only by
        hand (`runtime-modules enable`).
      '';
    };

    hooks = {
      preApply = hooksOption "pre-apply" "before each apply";
      postApply = hooksOption "post-apply" "after each apply that built a system (whatever its result; not after a veto, a dry run or nothing to do)";
      timeout = mkOption {
        type = types.ints.positive;
        default = 30;
        description = ''
          Seconds a hook may run before it is killed (a pre-apply hook that times out vetoes).
          The daemon's setting: a `runtime-modules enable` run while no daemon runs uses 30 s
          unless `RUNTIME_MODULES_HOOK_TIMEOUT` is set; see docs/nixos.md.
        '';
      };
    };

    applyTimeout = mkOption {
      type = types.ints.positive;
      default = 1800;
      description = ''
        Seconds the build of an apply (`nixos-rebuild build`) may take before it is killed; the
        running system is then left untouched. An activation is never cut short. The daemon's
        setting: a `runtime-modules enable` run while no daemon runs uses 30 minutes (or
        `--timeout`); see docs/nixos.md.
      '';
    };

    controlGroup = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "wheel";
      description = ''
        Members of this group may enable, disable and override modules through the daemon,
        besides root. The group is created if it does not exist. `null`: root only.
      '';
    };

    logLevel = mkOption {
      type = types.enum [
        "debug"
        "info"
        "warning"
        "error"
      ];
      default = "info";
      description = "The daemon's log level in the journal (`journalctl -u runtime-modules`).";
    };

    internal = {
      moduleImports = mkOption {
        type = types.attrsOf (types.listOf types.raw);
        internal = true;
        readOnly = true;
        description = ''
          Each runtime module's imports, by name: what the generated flake passes to
          `extendModules` for the enabled modules. Every list ends with a small module that
          keeps the generated files and unit of the base system (see `internal.base`).
        '';
      };
      base = mkOption {
        type = types.raw;
        internal = true;
        readOnly = true;
        description = ''
          Set in extended systems only: the base system's generated files, package and unit,
          used instead of computing them again.
        '';
      };
    };
  };

  config = mkMerge [
    # Defined either way, so the generated flake finds an empty set rather than an error.
    { services.runtimeModules.internal.moduleImports = if cfg.enable then moduleImports else { }; }
    (mkIf cfg.enable {
      inherit assertions;
      warnings =
        map (
          m: "${opt}.modules: module ${m.name} uses `path`, which is deprecated; write `imports = [ ${toString m.path} ];` instead."
        ) (filter (m: m.path != null) cfg.modules)
        # runtime-modules locks an unlocked reference at the first apply and keeps that lock
        # until the reference's text changes (in /run: until reboot). So an extended system can
        # be built on another base than the running one: the old one after the base was updated
        # and rebuilt, upstream's newest after a reboot.
        ++ optional (isBase && cfg.flakeUrl != null && !(lockedFlakeRef cfg.flakeUrl)) ''
          ${opt}.flakeUrl = ${builtins.toJSON cfg.flakeUrl} is not locked (no rev= or narHash=):
          runtime modules may then extend another revision of it than the one this system was
          built from, and enabling a module can change or even upgrade the base system. Use
          ${opt}.flake = self, or a locked reference (with ?rev=<commit> or ?narHash=...).
        '';

      environment.systemPackages = [ generated.package ];
      system.extraDependencies = optionals (cfg.flake != null) flakeSources;
      environment.etc = generated.etc;
      services.udev.packages = [ generated.udevRules ];

      # The state directory must exist for the CLI even when the daemon never ran.
      systemd.tmpfiles.rules = [
        "d /run/runtime-modules 0755 root root - -"
        "d /var/lib/runtime-modules 0755 root root - -"
      ];

      users.groups = mkIf (cfg.controlGroup != null) { ${cfg.controlGroup} = { }; };
    })
    (mkIf (cfg.enable && cfg.watch.enable) { systemd.services.runtime-modules = generated.service; })
  ];
}
